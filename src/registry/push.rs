//! `bkbundle push` (SKELETON: being written).
