//! Single-pass decoding of vmdk images (not written yet).

use crate::ImageInfo;
use crate::decode::Job;
use crate::error::{Result, err};

/// Decodes the vmdk image in `job`'s stream into its output.
pub fn decode(_job: &mut Job<'_>) -> Result<ImageInfo> {
    Err(err!(
        Unsupported,
        "decoding vmdk images is not implemented yet"
    ))
}
