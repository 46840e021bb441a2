//! Staging the update image: find the campaign's image among those on the
//! appliance, or get one (fetched from the campaign's URL, or uploaded
//! from a `file:` image, streamed under a limit of its own within the
//! step's timeout), then wait until it is `VALID` and is the campaign's.

use super::{
    Api, FETCH, IMAGES, NpmStep, UPLOAD,
    answers::{ImageState, read_image},
    image_path,
};
use crate::{
    device_http::Reply,
    driver::{Failure, Next, StepError},
    drivers::riverbed,
    support::{image::LocalImage, lenient},
};
use reqwest::StatusCode;
use serde_json::{Value, json};

impl Api<'_, '_> {
    /// Fetches the campaign's image, or uploads it from a `file:` URL.
    pub(super) async fn get_image(&self) -> Result<Next<NpmStep>, StepError> {
        let target = &self.cx.job.target;
        let (reply, how) = match LocalImage::of(target, self.cx.image_dir).await? {
            Some(image) => (self.upload(&image).await?, "uploaded"),
            None => {
                let body = json!({ "url": target.image_url.as_str() });
                let reply = self
                    .send(|| Ok(self.cx.http.post(FETCH).json(&body)))
                    .await?;
                (riverbed::success(reply)?, "fetching")
            }
        };
        let image = read_image(&reply.json()?).map_err(|problem| reply.unreadable(&problem))?;
        let id = image
            .id
            .ok_or_else(|| reply.unreadable("the new image has no id"))?;
        Ok(Next::poll(NpmStep::AwaitImage {
            image: id,
            adopted: false,
        })
        .note(format!("image {id} {how}: {}", image.describe())))
    }

    /// `POST images/upload` of the file as `application/octet-stream`.
    async fn upload(&self, image: &LocalImage) -> Result<Reply, StepError> {
        let reply = self
            .send(|| {
                Ok(self
                    .cx
                    .http
                    .post(UPLOAD)
                    .header("content-type", "application/octet-stream")
                    .header("content-length", &image.size().to_string())
                    .timeout(self.cx.upload_timeout())
                    .body(image.stream()?))
            })
            .await?;
        riverbed::success(reply)
    }

    pub(super) async fn await_image(
        &self,
        id: u64,
        adopted: bool,
    ) -> Result<Next<NpmStep>, StepError> {
        let reply = self.send(|| Ok(self.cx.http.get(&image_path(id)))).await?;
        if reply.status == StatusCode::NOT_FOUND {
            return Err(StepError::refused(format!(
                "{}: image {id} is gone from the appliance",
                reply.what
            )));
        }
        let reply = riverbed::success(reply)?;
        let image = read_image(&reply.json()?).map_err(|problem| reply.unreadable(&problem))?;
        let not_ours = |why: String| {
            Ok(Next::run(NpmStep::Stage)
                .note(format!("image {id} found on the appliance {why}; staging anew")))
        };
        match image.state {
            ImageState::Uploading | ImageState::Validating => {
                Ok(Next::poll(NpmStep::AwaitImage { image: id, adopted }).note(image.describe()))
            }
            ImageState::Invalid | ImageState::UploadError if adopted => {
                not_ours(format!("ended {}", image.state.name()))
            }
            ImageState::Invalid | ImageState::UploadError => Err(Failure::device(format!(
                "image {id} is {}: {}",
                image.state.name(),
                image.description
            ))
            .into()),
            ImageState::Valid => {
                let wanted = &self.cx.job.target.sha256;
                if let Some(checksum) = &image.checksum
                    && !checksum.eq_ignore_ascii_case(wanted)
                {
                    if adopted {
                        return not_ours(format!("has checksum {checksum}"));
                    }
                    return Err(Failure::device(format!(
                        "image {id} has checksum {checksum}, not the campaign's SHA-256 {wanted}"
                    ))
                    .into());
                }
                if let Some(version) = &image.version
                    && version != self.target()
                {
                    if adopted {
                        return not_ours(format!("holds version {version}"));
                    }
                    return Err(Failure::device(format!(
                        "image {id} holds version {version}, not the campaign's {}",
                        self.target()
                    ))
                    .into());
                }
                Ok(Next::run(NpmStep::Init {
                    image: Some(id),
                    ours: false,
                })
                .note(image.describe()))
            }
        }
    }

    /// The image to follow rather than fetch: the campaign's (by checksum,
    /// else by version) that is valid or still arriving, else one still
    /// arriving that cannot be told apart yet (it may be this job's fetch,
    /// its answer lost). Never a failed one: an earlier job's failure does
    /// not doom this job.
    pub(super) async fn find_image(&self) -> Result<Option<u64>, StepError> {
        let reply = riverbed::success(self.send(|| Ok(self.cx.http.get(IMAGES))).await?)?;
        let body: Value = reply.json()?;
        let items = lenient::items(&body).map_err(|problem| reply.unreadable(&problem))?;
        let wanted = &self.cx.job.target.sha256;
        let mut candidates = Vec::new();
        for item in items {
            let image = read_image(item).map_err(|problem| reply.unreadable(&problem))?;
            let (Some(id), false) = (image.id, image.state.failed()) else {
                continue;
            };
            let identified = match (&image.checksum, &image.version) {
                (Some(checksum), _) => Some(checksum.eq_ignore_ascii_case(wanted)),
                (None, Some(version)) => Some(version == self.target()),
                (None, None) => None,
            };
            let arriving = matches!(image.state, ImageState::Uploading | ImageState::Validating);
            match identified {
                Some(true) => candidates.push((0, id)),
                None if arriving => candidates.push((1, id)),
                _ => {}
            }
        }
        candidates.sort();
        Ok(candidates.first().map(|(_, id)| *id))
    }
}
