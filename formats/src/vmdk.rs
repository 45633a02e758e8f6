//! vmdk: header parsing and validation (being written).

use crate::error::{Result, err};
use crate::view::View;
use crate::ImageInfo;

/// Whether the first bytes of an image are a vmdk image.
pub(crate) fn matches(_head: &[u8]) -> bool {
    false
}

/// Validates a vmdk image and computes its virtual size.
pub fn probe(_view: &dyn View) -> Result<ImageInfo> {
    Err(err!(Unsupported, "vmdk is not supported yet"))
}
