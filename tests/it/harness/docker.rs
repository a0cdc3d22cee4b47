//! The host's Docker engine and the demo images built by `scripts/demo-images.sh`.

use super::{repo_root, run};
use std::process::Command;
use std::sync::{Mutex, MutexGuard};

/// The images `scripts/demo-images.sh` builds: the base (`docker import` of a busybox-static
/// root filesystem) and two images built on it that share its layer.
pub const DEMO_IMAGES: [&str; 3] = ["bkbundle-demo/base:1", "bkbundle-demo/app:1", "bkbundle-demo/web:1"];

const SETUP_HINT: &str = "install and start Docker with scripts/setup.sh \
     (apt-get install docker.io, then start dockerd)";

/// Panics, saying how to install and start Docker (`scripts/setup.sh`), unless `docker info`
/// works. Every test that needs the engine calls this first: it never skips.
pub fn require_docker() {
    let out = run(
        Command::new("docker").args(["info", "--format", "{{.ServerVersion}}"]),
        "docker info",
        SETUP_HINT,
    );
    if !out.status.success() {
        panic!(
            "the Docker engine does not answer `docker info` ({}): {SETUP_HINT}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
}

/// Serialises tests that change the engine's global state (removing, loading or retagging
/// images, the demo compose project): hold the guard for the whole test. Tests that only read
/// need not take it. A test that panicked while holding it does not poison it for the others.
pub fn docker_lock() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Makes sure the demo images exist: runs `scripts/demo-images.sh` the first time it is called
/// in this test process (calls are serialised; the script itself skips images that exist).
/// Later calls only check with `docker image inspect` and run the script again when a test has
/// removed one of the images. Panics with the script's output if it fails.
pub fn ensure_demo_images() {
    static RAN: Mutex<bool> = Mutex::new(false);
    require_docker();
    let mut ran = RAN.lock().unwrap_or_else(|e| e.into_inner());
    if *ran && all_demo_images_present() {
        return;
    }
    let script = repo_root().join("scripts/demo-images.sh");
    let out = run(
        Command::new("bash").arg(&script).current_dir(repo_root()),
        "scripts/demo-images.sh",
        "bash is required",
    );
    if !out.status.success() {
        panic!(
            "{} failed ({}); run scripts/setup.sh first\n--- stdout ---\n{}\n--- stderr ---\n{}",
            script.display(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert!(
        all_demo_images_present(),
        "scripts/demo-images.sh succeeded but not all of {DEMO_IMAGES:?} exist"
    );
    *ran = true;
}

fn all_demo_images_present() -> bool {
    Command::new("docker")
        .args(["image", "inspect", "--format", "{{.Id}}"])
        .args(DEMO_IMAGES)
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// The image names a test made for itself, removed from the engine when the test ends (whatever
/// it left), last made first (a child before its parent).
pub struct OwnImages(pub Vec<String>);

impl Drop for OwnImages {
    fn drop(&mut self) {
        for r in self.0.iter().rev() {
            let _ = Command::new("docker").args(["rmi", r]).output();
        }
    }
}
