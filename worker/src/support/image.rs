//! Campaign images the worker uploads itself: a `file:` image URL names a
//! file on the worker, checked against the campaign's SHA-256 before a byte
//! is sent, then streamed from disk (never read into memory whole).
//!
//! Only files under the worker's `FLOTILLA_IMAGE_DIR` are images: a job
//! names its `file:` URL, and a job must not be able to upload any file
//! the worker can read (its secrets, say) to a device. The file's real
//! path is what is checked, so neither `..` nor a link leads out; a worker
//! without the setting refuses `file:` images.

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
    /// `image_dir` is the worker's `FLOTILLA_IMAGE_DIR`, canonical
    /// ([`canonical_dir`]).
    pub(crate) async fn of(
        target: &Target,
        image_dir: Option<&Path>,
    ) -> Result<Option<LocalImage>, StepError> {
        let url = &target.image_url;
        if url.scheme() != "file" {
            return Ok(None);
        }
        let named = url.to_file_path().map_err(|()| {
            StepError::misconfigured(format!("image URL {url} is not a local file path"))
        })?;
        let Some(dir) = image_dir else {
            return Err(StepError::misconfigured(format!(
                "image {} is a file on the worker, and this worker has no FLOTILLA_IMAGE_DIR: \
                 it uploads only files under that directory",
                named.display()
            )));
        };
        let path = tokio::fs::canonicalize(&named).await.map_err(|e| {
            StepError::worker_lacks(format!("cannot read image file {}: {e}", named.display()))
        })?;
        if !path.starts_with(dir) {
            return Err(StepError::misconfigured(format!(
                "image file {} is not under FLOTILLA_IMAGE_DIR {} (links followed: {}); \
                 this worker uploads no other file",
                named.display(),
                dir.display(),
                path.display()
            )));
        }
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

/// The real path of a `FLOTILLA_IMAGE_DIR`, read once at start; it must be
/// a directory.
pub(crate) fn canonical_dir(dir: &Path) -> std::io::Result<PathBuf> {
    let canonical = std::fs::canonicalize(dir)?;
    if !canonical.is_dir() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::NotADirectory,
            "not a directory",
        ));
    }
    Ok(canonical)
}

/// The SHA-256 (lowercase hex) and size of a file, read in chunks.
async fn file_sha256(path: &Path) -> Result<(String, u64), StepError> {
    let unreadable = |e: std::io::Error| {
        StepError::worker_lacks(format!("cannot read image file {}: {e}", path.display()))
    };
    let mut file = tokio::fs::File::open(path).await.map_err(unreadable)?;
    let is_file = file.metadata().await.map_err(unreadable)?.is_file();
    if !is_file {
        return Err(StepError::misconfigured(format!(
            "image {} is not a regular file",
            path.display()
        )));
    }
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

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("flotilla-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        canonical_dir(&dir).unwrap()
    }

    fn assert_config_failure(error: &StepError, words: &str) {
        assert!(
            matches!(error, StepError::Fail(f) if f.class == ErrorClass::Config),
            "a config failure, not retried: {error:?}"
        );
        assert!(error.message().contains(words), "{error}");
    }

    #[tokio::test]
    async fn local_images_are_checked_before_they_are_sent() {
        let dir = scratch("image");
        let path = dir.join("fw.img");
        std::fs::write(&path, "test").unwrap();
        let url = url::Url::from_file_path(&path).unwrap();
        let good = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
        let image = LocalImage::of(&target(url.clone(), good), Some(&dir))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(image.size(), 4);
        let wrong = LocalImage::of(&target(url, &"ab".repeat(32)), Some(&dir))
            .await
            .unwrap_err();
        assert!(
            matches!(&wrong, StepError::Fail(f) if f.class == ErrorClass::Config),
            "a config failure, not retried: {wrong:?}"
        );
        assert!(wrong.message().contains("SHA-256"), "{wrong}");
        let remote = "http://files.example.net/fw.bin".parse().unwrap();
        assert!(
            LocalImage::of(&target(remote, good), None)
                .await
                .unwrap()
                .is_none()
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn only_files_under_the_image_dir_are_images() {
        let root = scratch("image-dir");
        let dir = root.join("images");
        std::fs::create_dir_all(&dir).unwrap();
        let dir = canonical_dir(&dir).unwrap();
        let outside = root.join("secret");
        std::fs::write(&outside, "test").unwrap();
        std::fs::write(dir.join("fw.img"), "test").unwrap();
        std::os::unix::fs::symlink(&outside, dir.join("link.img")).unwrap();
        let good = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
        let of = |path: PathBuf, dir: Option<PathBuf>| async move {
            let url = url::Url::from_file_path(&path).unwrap();
            LocalImage::of(&target(url, good), dir.as_deref()).await
        };

        let plain = of(outside.clone(), Some(dir.clone())).await.unwrap_err();
        assert_config_failure(&plain, "not under FLOTILLA_IMAGE_DIR");
        let climbing = of(dir.join("../secret"), Some(dir.clone()))
            .await
            .unwrap_err();
        assert_config_failure(&climbing, "not under FLOTILLA_IMAGE_DIR");
        let linked = of(dir.join("link.img"), Some(dir.clone()))
            .await
            .unwrap_err();
        assert_config_failure(&linked, "links followed");
        let no_dir = of(dir.join("fw.img"), None).await.unwrap_err();
        assert_config_failure(&no_dir, "no FLOTILLA_IMAGE_DIR");
        assert!(
            of(dir.join("fw.img"), Some(dir.clone()))
                .await
                .unwrap()
                .is_some()
        );
        // A directory of the image dir is no image.
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        let directory = of(dir.join("sub"), Some(dir.clone())).await.unwrap_err();
        assert_config_failure(&directory, "not a regular file");
        std::fs::remove_dir_all(root).unwrap();
    }
}
