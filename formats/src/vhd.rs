//! vhd: header parsing and validation (being written).

use crate::error::{Result, err};
use crate::view::View;
use crate::ImageInfo;

/// Whether the first bytes of an image are a dynamic VHD (footer copy at offset 0).
pub(crate) fn matches(_head: &[u8]) -> bool {
    false
}

/// Validates a VHD image whose footer copy is at offset 0 and computes its virtual size.
pub fn probe(_view: &dyn View) -> Result<ImageInfo> {
    Err(err!(Unsupported, "vhd is not supported yet"))
}

/// Looks for a fixed VHD's footer in the last 512 bytes; `None` when there is none.
pub fn probe_fixed(_view: &dyn View) -> Result<Option<ImageInfo>> {
    Ok(None)
}
