//! Loading images into the engine straight from the bundle, with no extraction to disk.
//!
//! The bundle stores each layer once, compressed; the engine's `POST /images/load` takes a
//! `docker save` tar. A blocking thread writes that tar on the fly (the legacy layout: a
//! `manifest.json`, each config, each layer decompressed to `layers/<diff hex>.tar`, with sizes
//! known from the manifest so headers are written before the data) into a bounded channel whose
//! other end is the request body. All images that need loading go in one stream, so a layer
//! shared by several images is sent once, and a layer the engine already has (the same chain id:
//! the same layer on the same parents) is not sent at all: the engine's load looks a layer up by
//! its chain id before it opens the layer's file, so the tar names it in `manifest.json` and leaves
//! the file out. Memory: a few 1 MiB chunks in flight.

use crate::bundle::{tarfmt, VerifiedBundle};
use crate::delta::EngineLayers;
use crate::error::{Error, Result};
use crate::manifest::{Compression, Image, Manifest};
use crate::progress::Task;
use bytes::Bytes;
use std::collections::BTreeSet;
use std::io::{self, Read, Write};
use tokio::sync::mpsc;

const CHUNK: usize = 1 << 20;

/// A `Write` that cuts its input into chunks sent down a channel (blocking the writer when the
/// reader, the engine or a registry, reads slower: backpressure bounds memory). For blocking
/// threads only.
pub(crate) struct ChannelWriter {
    tx: mpsc::Sender<io::Result<Bytes>>,
    buf: Vec<u8>,
    /// Who reads the other end, for the error when it stops ("the Docker engine").
    reader: &'static str,
}

impl ChannelWriter {
    pub(crate) fn new(tx: mpsc::Sender<io::Result<Bytes>>, reader: &'static str) -> Self {
        ChannelWriter {
            tx,
            buf: Vec::with_capacity(CHUNK),
            reader,
        }
    }

    fn send(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = Bytes::from(std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK)));
        let reader = self.reader;
        self.tx.blocking_send(Ok(chunk)).map_err(|_| {
            io::Error::new(
                io::ErrorKind::BrokenPipe,
                format!("{reader} stopped reading the stream"),
            )
        })
    }
}

impl Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(CHUNK - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == CHUNK {
            self.send()?;
        }
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.send()
    }
}

fn hex(digest: &str) -> &str {
    digest.trim_start_matches("sha256:")
}

/// Write the `docker load` tar of `images` to `w`, leaving out the layers `engine` has.
pub fn write_load_tar(
    reader: &VerifiedBundle,
    m: &Manifest,
    images: &[&Image],
    engine: &EngineLayers,
    w: &mut dyn Write,
    task: &dyn Task,
) -> Result<()> {
    let mut out = LoadTar {
        name: reader.display_name(),
        w,
        task,
        sent: BTreeSet::new(),
    };
    let mut items = Vec::new();
    for img in images {
        let mut cfg = reader.config(img)?;
        let cfg_path = format!("{}.json", hex(&img.id));
        if out.sent.insert(cfg_path.clone()) {
            out.put(
                &cfg_path,
                cfg.size(),
                &mut cfg,
                &format!("config of {}", img.refs.join(", ")),
            )?;
        }
        let layer_paths = out.put_layers(reader, m, img, &engine.present(img))?;
        items.push(serde_json::json!({ "Config": cfg_path, "RepoTags": img.refs, "Layers": layer_paths }));
    }
    let manifest = serde_json::to_vec(&items).map_err(|e| Error::internal(format!("manifest.json: {e}")))?;
    out.put(
        "manifest.json",
        manifest.len() as u64,
        &mut &manifest[..],
        "manifest.json",
    )?;
    out.w.write_all(&[0u8; 1024]).map_err(stream_err)?;
    out.w.flush().map_err(stream_err)?;
    Ok(())
}

/// A failed write to the engine's stream.
fn stream_err(e: io::Error) -> Error {
    Error::external(format!("streaming images to the Docker engine: {e}"))
}

/// The `docker load` tar being written: each file (config or layer) shared by images goes in once.
struct LoadTar<'a> {
    /// The bundle's name, for messages.
    name: String,
    w: &'a mut dyn Write,
    task: &'a dyn Task,
    /// The tar paths already written.
    sent: BTreeSet<String>,
}

impl LoadTar<'_> {
    /// One file of `size` bytes from `data`, refused if the bundle gives more or fewer bytes than
    /// the manifest says.
    fn put(&mut self, path: &str, size: u64, data: &mut dyn Read, what: &str) -> Result<()> {
        let name = &self.name;
        self.w
            .write_all(&tarfmt::file_header(path, 0o644, size, 0))
            .map_err(stream_err)?;
        let mut buf = vec![0u8; 1 << 20];
        let mut left = size;
        loop {
            let n = data
                .read(&mut buf)
                .map_err(|e| Error::bundle(format!("{name}: cannot read {what}: {e}")))?;
            if n == 0 {
                break;
            }
            if n as u64 > left {
                return Err(Error::bundle(format!(
                    "{name}: {what} is longer than the manifest says ({size} bytes)"
                )));
            }
            self.w.write_all(&buf[..n]).map_err(stream_err)?;
            self.task.advance(n as u64);
            left -= n as u64;
        }
        if left != 0 {
            return Err(Error::bundle(format!(
                "{name}: {what} is {} bytes shorter than the manifest says ({size})",
                left
            )));
        }
        self.w
            .write_all(&[0u8; 512][..tarfmt::padding(size) as usize])
            .map_err(stream_err)?;
        Ok(())
    }

    /// The layers of `img` not yet written and not `present` in the engine, decompressed as the
    /// engine takes them; returns the tar paths of all its layers, for its `manifest.json` item.
    fn put_layers(
        &mut self,
        reader: &VerifiedBundle,
        m: &Manifest,
        img: &Image,
        present: &[bool],
    ) -> Result<Vec<String>> {
        let mut layer_paths = Vec::new();
        for (i, diff) in img.layers.iter().enumerate() {
            let layer = m
                .layer(diff)
                .ok_or_else(|| Error::bundle(format!("{}: layer {diff} is not in the manifest", self.name)))?;
            let path = format!("layers/{}.tar", hex(diff));
            if present.get(i).copied().unwrap_or(false) {
                layer_paths.push(path);
                continue;
            }
            if self.sent.insert(path.clone()) {
                if m.from_base(&layer.file) {
                    // Install checked this before it changed anything (`delta::image_gaps`).
                    return Err(Error::bundle(format!(
                        "{}: layer {diff} of image {} is left to the base bundle and the Docker engine does not have it",
                        self.name,
                        img.refs.join(", ")
                    )));
                }
                let raw = reader.layer(layer)?;
                let compression = crate::bundle::layout::layer_compression(&layer.file).unwrap_or(m.bundle.compression);
                let mut plain: Box<dyn Read> = match compression {
                    Compression::Zstd => Box::new(
                        zstd::stream::read::Decoder::new(raw).map_err(|e| Error::internal(format!("zstd: {e}")))?,
                    ),
                    Compression::Gzip => Box::new(flate2::read::GzDecoder::new(raw)),
                };
                self.put(&path, layer.size, &mut plain, &layer.file)?;
            }
            layer_paths.push(path);
        }
        Ok(layer_paths)
    }
}

/// Spawn the writer thread; returns the body stream for the engine and the thread's handle.
pub fn spawn_load_stream(
    reader: std::sync::Arc<VerifiedBundle>,
    manifest: std::sync::Arc<Manifest>,
    images: Vec<Image>,
    engine: std::sync::Arc<EngineLayers>,
    task: std::sync::Arc<dyn Task>,
) -> (
    impl futures_util::Stream<Item = io::Result<Bytes>> + Send + 'static,
    tokio::task::JoinHandle<Result<()>>,
) {
    let (tx, rx) = mpsc::channel::<io::Result<Bytes>>(4);
    let handle = tokio::task::spawn_blocking(move || {
        let mut w = ChannelWriter::new(tx.clone(), "the Docker engine");
        let refs: Vec<&Image> = images.iter().collect();
        let r = write_load_tar(&reader, &manifest, &refs, &engine, &mut w, &*task);
        if let Err(e) = &r {
            // Abort the upload so the engine discards the partial stream.
            let _ = tx.blocking_send(Err(io::Error::other(e.message.clone())));
        }
        r
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|item| (item, rx)) });
    (stream, handle)
}
