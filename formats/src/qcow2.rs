//! qcow2 (being written).

use crate::error::{Result, err};
use crate::view::View;
use crate::ImageInfo;

pub(crate) fn matches(head: &[u8]) -> bool {
    head.starts_with(b"QFI\xfb")
}

/// Validates a qcow2 image and computes its virtual size.
pub fn probe(_view: &dyn View) -> Result<ImageInfo> {
    Err(err!(Unsupported, "qcow2 is not supported yet"))
}
