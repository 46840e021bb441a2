//! The answers of `update/init` and `update/start`: one string per gateway,
//! `"10.1.x.x - Operation Failed"` or `"10.2.x.x - Operation Successfull"`
//! (sic).

use crate::{device_http::Reply, driver::StepError};
use serde_json::Value;

/// One gateway's line of an init or start answer.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Answer {
    pub(super) ip: String,
    pub(super) succeeded: bool,
    /// The answer as given, after the IP (`Operation Failed`).
    pub(super) text: String,
}

/// Reads an init or start answer: a list of lines (or, leniently, one).
pub(super) fn parse_answers(reply: &Reply) -> Result<Vec<Answer>, StepError> {
    let lines: Vec<String> = match reply.json::<Value>()? {
        Value::Array(items) => items
            .into_iter()
            .map(|item| match item {
                Value::String(line) => Ok(line),
                other => Err(other),
            })
            .collect::<Result<_, _>>()
            .map_err(|other| {
                StepError::garbage(format!(
                    "{} answered {other} where a gateway's result was expected",
                    reply.what
                ))
            })?,
        Value::String(line) => vec![line],
        _ => return Err(reply.unreadable("not a list of gateway results")),
    };
    lines
        .iter()
        .map(|line| {
            parse_answer(line).ok_or_else(|| {
                StepError::garbage(format!(
                    "{} answered {line:?}, not \"<gateway IP> - Operation Successful|Failed\"",
                    reply.what
                ))
            })
        })
        .collect()
}

fn parse_answer(line: &str) -> Option<Answer> {
    let (ip, text) = line.split_once(" - ")?;
    let lower = text.trim().to_ascii_lowercase();
    let succeeded = if lower.contains("fail") {
        false
    } else if lower.contains("success") {
        true
    } else {
        return None;
    };
    Some(Answer {
        ip: ip.trim().to_owned(),
        succeeded,
        text: text.trim().to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_read_per_gateway_whatever_the_spelling() {
        let failed = parse_answer("10.1.0.1 - Operation Failed").unwrap();
        assert_eq!(failed.ip, "10.1.0.1");
        assert!(!failed.succeeded);
        assert!(
            parse_answer("10.2.0.1 - Operation Successfull")
                .unwrap()
                .succeeded
        );
        assert!(
            parse_answer("10.2.0.1 - Operation Successful")
                .unwrap()
                .succeeded
        );
        assert_eq!(parse_answer("10.2.0.1 Operation Successful"), None);
        assert_eq!(parse_answer("10.2.0.1 - maybe"), None);
    }
}
