//! `bkbundle backup` and `bkbundle restore`: a site's data, objects, secrets and stack in one
//! verified file (`.bkbak`), and the site brought back from it.

pub mod objects;
pub mod pg;
