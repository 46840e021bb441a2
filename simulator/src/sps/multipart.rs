//! Just enough `multipart/form-data` reading for a firmware upload: the
//! bytes of one named field. A malformed body reads as no field, which the
//! appliance answers as a missing field.

/// The content of field `name` in a `multipart/form-data` body.
pub(super) fn field<'b>(content_type: &str, body: &'b [u8], name: &str) -> Option<&'b [u8]> {
    let boundary = content_type
        .split(';')
        .map(str::trim)
        .find_map(|param| param.strip_prefix("boundary="))?
        .trim_matches('"');
    let delimiter = format!("--{boundary}");
    let wanted = format!("name=\"{name}\"");
    let mut rest = body;
    // Everything before the first delimiter is preamble.
    let start = find(rest, delimiter.as_bytes())?;
    rest = &rest[start + delimiter.len()..];
    loop {
        if rest.starts_with(b"--") {
            return None;
        }
        let part_end = find(rest, format!("\r\n{delimiter}").as_bytes())?;
        let part = rest.get(2..part_end)?; // after the delimiter's CRLF
        let headers_end = find(part, b"\r\n\r\n")?;
        let headers = String::from_utf8_lossy(&part[..headers_end]);
        let is_wanted = headers.lines().any(|line| {
            line.to_ascii_lowercase()
                .starts_with("content-disposition: form-data")
                && line.contains(&wanted)
        });
        if is_wanted {
            return Some(&part[headers_end + 4..]);
        }
        rest = &rest[part_end + 2 + delimiter.len()..];
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_named_field_is_found_byte_for_byte() {
        let body = b"--XyZ\r\n\
            Content-Disposition: form-data; name=\"note\"\r\n\r\n\
            hello\r\n\
            --XyZ\r\n\
            Content-Disposition: form-data; name=\"firmware\"; filename=\"sps.iso\"\r\n\
            Content-Type: application/octet-stream\r\n\r\n\
            \x00ISO\r\nbytes\r\n\
            --XyZ--\r\n";
        let content_type = "multipart/form-data; boundary=XyZ";
        assert_eq!(
            field(content_type, body, "firmware"),
            Some(&b"\x00ISO\r\nbytes"[..])
        );
        assert_eq!(field(content_type, body, "note"), Some(&b"hello"[..]));
        assert_eq!(field(content_type, body, "other"), None);
        assert_eq!(field("application/json", body, "firmware"), None);
        assert_eq!(field(content_type, b"garbage", "firmware"), None);
    }
}
