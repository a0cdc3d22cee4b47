//! The bundle on disk: the only code that knows its format (see docs/FORMAT.md).
//!
//! - [`tarfmt`]: tar headers, written and parsed.
//! - [`parts`]: one file or numbered parts as one byte stream; temporary names until commit.
//! - [`writer`]: streams payloads in, records their sizes and digests.
//! - [`reader`]: indexes an existing bundle without extracting it.

pub mod parts;
pub mod reader;
pub mod tarfmt;
pub mod writer;

pub use reader::{BundleReader, Entry};
pub use writer::BundleWriter;

/// Bundle path of a layer's payload, named by its diff id's hex.
pub fn layer_path(diff_hex: &str, ext: &str) -> String {
    format!("images/layers/{diff_hex}.tar.{ext}")
}

/// Bundle path of an image config, named by the image id's hex.
pub fn config_path(id_hex: &str) -> String {
    format!("images/configs/{id_hex}.json")
}
