//! `dvcr-importer`: turns a source (an HTTP URL, an image in a container registry, another
//! DVCR image, an existing disk, or a blank disk) into a DVCR artifact or a filled disk, in
//! one pass over the source bytes.
//!
//! - [`source`]: HTTP(S), files and block devices, standard input, as blocking readers.
//! - [`oci`]: a streaming client for OCI/Docker registries (pull the `disk/` file, push
//!   blobs and manifests, mount across repositories).
//! - [`checksum`]: user checksums verified in the same pass.
//! - [`artifact`]: the DVCR artifact layout (tar layer, config labels, manifest).
//! - [`pipeline`]: one import from source to destination.
//! - [`report`]: progress, Prometheus gauges and the final report of the job contract.

pub mod artifact;
pub mod checksum;
pub mod chunk;
pub mod env;
pub mod error;
pub mod oci;
pub mod pipeline;
pub mod report;
pub mod source;

pub use error::{ErrorKind, ImportError};
pub use pipeline::{Destination, DiskFormat, Job, Outcome, Source, run};
pub use source::{Location, SourceError};
