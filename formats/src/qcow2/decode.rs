//! Single-pass decoding of qcow2 images (not written yet).

use crate::ImageInfo;
use crate::decode::Job;
use crate::error::{Result, err};

/// Decodes the qcow2 image in `job`'s stream into its output.
pub fn decode(_job: &mut Job<'_>) -> Result<ImageInfo> {
    Err(err!(
        Unsupported,
        "decoding qcow2 images is not implemented yet"
    ))
}
