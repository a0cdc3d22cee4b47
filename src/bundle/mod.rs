//! The bundle on disk: the only code that knows its format (see docs/FORMAT.md).
//!
//! - [`layout`]: where every entry sits, and the `SHA256SUMS` text.
//! - [`tarfmt`]: tar headers, written and parsed.
//! - [`parts`]: one file or numbered parts as one byte stream; temporary names until commit.
//! - [`writer`]: streams payloads in, records their sizes and digests.
//! - [`reader`]: indexes an existing bundle without extracting it.
//! - [`verified`]: the one way commands get a bundle, [`open_verified`]: framing, manifest,
//!   signature and the entries against the manifest checked before anything is read, and every
//!   byte read afterwards checked against its digest.

pub mod layout;
pub mod parts;
pub mod reader;
pub mod tarfmt;
pub mod verified;
pub mod writer;

pub use reader::{BundleReader, Entry};
pub use verified::{
    open_document, open_verified, Check, Document, EntryReader, OpenOptions, SignatureStatus, StackFile, Verified,
    VerifiedBundle,
};
pub use writer::BundleWriter;
