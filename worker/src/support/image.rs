//! Campaign images the worker uploads itself: a `file:` image URL names a
//! file on the worker, checked against the campaign's SHA-256 before a byte
//! is sent, then streamed from disk (never read into memory whole).

use crate::driver::StepError;
use flotilla_common::Target;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use tokio::io::AsyncReadExt;

/// A local image file whose SHA-256 is the campaign's.
#[derive(Debug)]
pub(crate) struct LocalImage {
    path: PathBuf,
    size: u64,
}

impl LocalImage {
    /// The campaign's image if it is a `file:` URL (`None` for one a device
    /// fetches itself), checked against the campaign's SHA-256.
    pub(crate) async fn of(target: &Target) -> Result<Option<LocalImage>, StepError> {
        let url = &target.image_url;
        if url.scheme() != "file" {
            return Ok(None);
        }
        let path = url.to_file_path().map_err(|()| {
            StepError::misconfigured(format!("image URL {url} is not a local file path"))
        })?;
        let (sha256, size) = file_sha256(&path).await?;
        if sha256 != target.sha256 {
            return Err(StepError::misconfigured(format!(
                "image file {} has SHA-256 {sha256}, not the campaign's {}",
                path.display(),
                target.sha256
            )));
        }
        Ok(Some(LocalImage { path, size }))
    }

    pub(crate) fn size(&self) -> u64 {
        self.size
    }

    /// The file's name, for a multipart upload.
    pub(crate) fn file_name(&self) -> String {
        self.path.file_name().map_or_else(
            || "firmware.img".into(),
            |name| name.to_string_lossy().into_owned(),
        )
    }

    /// The file, opened anew, as a body streamed from disk.
    pub(crate) fn stream(&self) -> Result<reqwest::Body, StepError> {
        let file = std::fs::File::open(&self.path).map_err(|e| {
            StepError::worker_lacks(format!(
                "cannot open image file {}: {e}",
                self.path.display()
            ))
        })?;
        Ok(reqwest::Body::from(tokio::fs::File::from_std(file)))
    }
}

/// The SHA-256 (lowercase hex) and size of a file, read in chunks.
async fn file_sha256(path: &Path) -> Result<(String, u64), StepError> {
    let unreadable = |e: std::io::Error| {
        StepError::worker_lacks(format!("cannot read image file {}: {e}", path.display()))
    };
    let mut file = tokio::fs::File::open(path).await.map_err(unreadable)?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = file.read(&mut buffer).await.map_err(unreadable)?;
        if n == 0 {
            break;
        }
        size += n as u64;
        hasher.update(&buffer[..n]);
    }
    Ok((format!("{:x}", hasher.finalize()), size))
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_common::ErrorClass;

    fn target(url: url::Url, sha256: &str) -> Target {
        Target {
            version: "7.2.1".into(),
            image_url: url,
            sha256: sha256.into(),
        }
    }

    #[tokio::test]
    async fn local_images_are_checked_before_they_are_sent() {
        let path = std::env::temp_dir().join(format!("flotilla-image-{}", std::process::id()));
        std::fs::write(&path, "test").unwrap();
        let url = url::Url::from_file_path(&path).unwrap();
        let good = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
        let image = LocalImage::of(&target(url.clone(), good))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(image.size(), 4);
        let wrong = LocalImage::of(&target(url, &"ab".repeat(32)))
            .await
            .unwrap_err();
        assert!(
            matches!(&wrong, StepError::Fail(f) if f.class == ErrorClass::Config),
            "a config failure, not retried: {wrong:?}"
        );
        assert!(wrong.message().contains("SHA-256"), "{wrong}");
        let remote = "http://files.example.net/fw.bin".parse().unwrap();
        assert!(
            LocalImage::of(&target(remote, good))
                .await
                .unwrap()
                .is_none()
        );
        std::fs::remove_file(path).unwrap();
    }
}
