//! The stack's own PostgreSQL, dumped and restored with the tools of the image it runs, through
//! the Docker Engine API (exec), streamed.
