//! Every object of the site's NATS JetStream object store, read out and written back, streamed
//! and checked by digest.
