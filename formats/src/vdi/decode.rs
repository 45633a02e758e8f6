//! Single-pass decoding of vdi images (not written yet).

use crate::ImageInfo;
use crate::decode::Job;
use crate::error::{Result, err};

/// Decodes the vdi image in `job`'s stream into its output.
pub fn decode(_job: &mut Job<'_>) -> Result<ImageInfo> {
    Err(err!(
        Unsupported,
        "decoding vdi images is not implemented yet"
    ))
}
