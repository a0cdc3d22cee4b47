//! Command-line surface (clap). Turns arguments into the library's plain option structs; the help
//! text here is the operator's manual for each flag.

use bkbundle::manifest::{Compression, Os, PackageType};
use bkbundle::{install, pack, packages, verify};
use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

/// `bkbundle --help`'s exit-code table, from [`bkbundle::error::EXIT_CODES`] (the README's
/// comes from the same table): the code right-aligned, the meaning wrapped at [`HELP_WIDTH`].
pub fn exit_codes_help() -> String {
    let mut s = String::from("Exit codes:");
    for d in bkbundle::error::EXIT_CODES {
        s.push_str(&format!("\n{:>3}  ", d.code));
        let mut col = 5;
        for (i, word) in d.meaning.split_whitespace().enumerate() {
            if i > 0 && col + 1 + word.len() > HELP_WIDTH {
                s.push_str("\n     ");
                col = 5;
            } else if i > 0 {
                s.push(' ');
                col += 1;
            }
            s.push_str(word);
            col += word.len();
        }
    }
    s
}

/// Columns of hand-laid help text (clap's own wrapping stops at 100 too).
const HELP_WIDTH: usize = 100;

#[derive(Parser, Debug)]
#[command(
    name = "bkbundle",
    version,
    about = "Pack BK-Lite into one verified offline bundle, and install it on an air-gapped host",
    long_about = "Pack BK-Lite (images, agent packages, compose stack) into one verified, self-contained \
bundle on a connected machine; verify, inspect and install it on a host that reaches nothing outside.\n\n\
Typical use:\n  bkbundle pack manifests/bklite.toml -o bklite-3.1.0.bkb\n  bkbundle verify bklite-3.1.0.bkb\n  bkbundle inspect bklite-3.1.0.bkb\n  bkbundle install bklite-3.1.0.bkb --config install.toml --dry-run\n  bkbundle install bklite-3.1.0.bkb --config install.toml",
    after_help = exit_codes_help()
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Args, Debug, Clone)]
pub struct Global {
    /// Print machine-readable JSON on stdout (errors too) instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    /// Print only errors.
    #[arg(short, long, global = true)]
    pub quiet: bool,
    /// More diagnostics on stderr (-v, -vv).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Hide progress bars (they are hidden anyway when stderr is not a terminal).
    #[arg(long, global = true)]
    pub no_progress: bool,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Gather images, agent packages and stack files into one bundle (on a connected machine).
    #[command(
        after_help = "Split sizes: K, M, G, T (and KB, MB, GB) are powers of 1000, KiB, MiB, GiB are powers of 1024; \
`--split-size 4G` makes parts of 4,000,000,000 bytes, which FAT32 media accept.\n\n\
Images come from the local Docker engine (docker save through its API), from `archive` files, from
`oci_layout` directories, or, when the recipe's [registry] (or --mirror) names a registry, from it
by digest: each layer fetched once, skipped when the bundle already has it, gzip and zstd layers
stored as the registry holds them. --registry-* say how to reach that registry."
    )]
    Pack(PackArgs),
    /// Check every file of a bundle (and its signature) without changing anything.
    Verify(VerifyArgs),
    /// Show what a bundle holds: images, packages, stack files, regions, sizes.
    Inspect(InspectArgs),
    /// Make a full bundle from a delta (`pack --base`) and the base it was packed against, for a
    /// site that was never installed from the base.
    Merge(MergeArgs),
    /// Install a bundle on this (offline) host: verify, preflight, load images, lay out and start the stack, wait on health.
    #[command(after_help = INSTALL_HELP)]
    Install(InstallArgs),
    /// Check or seed every cloud region's sidecar env (NODE_SERVER_URL, NATS_*, ...) in the platform's database.
    #[command(after_help = REGIONS_HELP)]
    Regions(RegionsArgs),
    /// Upload the bundle's agent packages to the platform's NATS object store and register them
    /// (node_mgmt_packageversion), idempotently.
    #[command(after_help = INIT_PACKAGES_HELP)]
    InitPackages(InitPackagesArgs),
    /// Diagnose a live install: containers, cloud regions, NATS, packages, agents; with the
    /// evidence and the fix for each finding.
    #[command(after_help = DOCTOR_HELP)]
    Doctor(DoctorArgs),
    /// Back a site up into one file: its databases, objects, stack files and secrets; or check
    /// (`backup verify`) or show (`backup inspect`) a backup.
    #[command(after_help = BACKUP_HELP, args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
    Backup(BackupArgs),
    /// Bring a site back from a backup, on this host or a new one, with the bundle it ran.
    #[command(after_help = RESTORE_HELP)]
    Restore(RestoreArgs),
    /// Push the bundle's images into an OCI distribution registry (Harbor, registry:2) in the
    /// intranet, for other hosts to pull (`install --images-from`).
    #[command(after_help = PUSH_HELP)]
    Push(PushArgs),
    /// Print shell completions (bash, zsh, fish, ...) to stdout.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

#[derive(Args, Debug)]
pub struct PackArgs {
    /// The recipe (TOML, see docs/FORMAT.md), e.g. manifests/bklite.toml.
    pub recipe: PathBuf,
    /// Where to write the bundle (with --split-size: OUT.001, OUT.002, ...).
    #[arg(short, long, value_name = "BUNDLE")]
    pub output: PathBuf,
    /// Compression of image layers.
    #[arg(long, value_enum, default_value_t = CompressionArg::Zstd)]
    pub compression: CompressionArg,
    /// Compression level (zstd 1-19, default 3; gzip 1-9, default 6).
    #[arg(long)]
    pub level: Option<i32>,
    /// Cut the bundle into numbered parts of at most this size, e.g. 4G for FAT32 media.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub split_size: Option<u64>,
    /// Sign the manifest with this minisign secret key (password from BKBUNDLE_SIGN_PASSWORD or a prompt).
    #[arg(long, value_name = "KEY")]
    pub sign: Option<PathBuf>,
    /// Compression threads (default: number of CPUs).
    #[arg(long)]
    pub threads: Option<u32>,
    /// The bkbundle to carry as bin/bkbundle (default: this one). It must start on any x86-64
    /// Linux from glibc 2.17 on (static, as `cargo build` in the source tree makes it).
    #[arg(long, value_name = "PATH")]
    pub binary: Option<PathBuf>,
    /// Leave the image layers out: the manifest still names every image (id, config, layer
    /// digests); install pulls the images from a registry (`install --images-from REGISTRY`, after
    /// `push` of a full bundle there) and checks each id.
    #[arg(long)]
    pub no_images: bool,
    /// Pack a delta of this bundle (the one the site was installed from): only the layers,
    /// packages and installers it does not have are stored, and its id is recorded. Install the
    /// delta on a site installed from the base; `bkbundle merge BASE NEW -o FULL` makes a full
    /// bundle again.
    #[arg(long, value_name = "OLD.bkb", conflicts_with_all = ["base_manifest", "no_images"])]
    pub base: Option<PathBuf>,
    /// As --base, from the base's bundle.toml alone (`tar -xf OLD.bkb bundle.toml`: small enough
    /// to carry back from the offline site).
    #[arg(long, value_name = "BUNDLE.TOML", conflicts_with = "no_images")]
    pub base_manifest: Option<PathBuf>,
    /// HOST[:PORT][/PREFIX] of the registry to fetch the recipe's plain references from, in place
    /// of the recipe's [registry] mirror (its `library` setting kept), e.g. harbor.intranet/bklite.
    /// Images with `archive`, `oci_layout` or `engine = true` keep their own source.
    #[arg(long, value_name = "REGISTRY")]
    pub mirror: Option<String>,
    /// Give layers fetched from a registry or an OCI layout the bundle's --compression too
    /// (default: a gzip or zstd blob is stored as it is, which is much faster).
    #[arg(long)]
    pub recompress: bool,
    #[command(flatten)]
    pub access: RegistryAccessArgs,
}

#[derive(Args, Debug)]
pub struct VerifyArgs {
    /// The bundle file, or the first part (NAME.001) of a split bundle.
    pub bundle: PathBuf,
    /// Refuse a bundle that is not signed by --key.
    #[arg(long, requires = "key")]
    pub require_signature: bool,
    /// The trusted minisign public key (.pub): the bundle must carry a signature by it.
    #[arg(long, value_name = "PUBKEY")]
    pub key: Option<PathBuf>,
    /// Hashing threads (default: number of CPUs).
    #[arg(long)]
    pub threads: Option<usize>,
}

pub const INSTALL_HELP: &str = "\
The install config (--config install.toml) holds what only the site knows:
  format = 1
  target = \"/opt/bklite\"          # where the stack is laid out (--target wins)
  project = \"bklite\"              # compose project name (default: the bundle's)
  [env]                           # values for the stack's env template
  HOST_IP = \"10.0.0.5\"
  SERVER_URL = \"https://10.0.0.5:443\"
  [health]
  timeout_secs = 600              # deadline for the stack to become healthy
  steady_secs = 5                 # a service without a health check is ready after this long
  [database]                      # optional: see `bkbundle regions --help`
  [[regions]]                     # optional: the site's cloud regions, see `bkbundle regions --help`
  [registry]                      # optional: where the images come from (--images-from's default)
  url = \"harbor.intranet/bklite\"  # HOST[:PORT][/PREFIX]
  ca_file = \"/etc/pki/ca.crt\"     # its CA (install writes /etc/docker/certs.d/HOST/ca.crt)
  insecure = false                # plain HTTP (the engine must allow it: insecure-registries)
  username = \"robot\"              # with password_file; else what `docker login` stored
  password_file = \"/etc/bkbundle/registry.pass\"

Images from a registry (--images-from REGISTRY, for a bundle packed with --no-images after `push`
of the full one): the engine pulls each image the host lacks, its id is checked against the
bundle's manifest, and it is tagged with the references the stack uses. Preflight checks first that
the registry has every one with the bundle's id, and changes nothing when it does not.

A delta bundle (pack --base OLD) installs on a site installed from OLD: what it leaves to OLD is
taken from the engine (layers by chain id, images by id) and the object store (packages and
installers by digest); preflight stops, changing nothing, naming every part the site lacks and the
bundle to bring (or `bkbundle merge OLD NEW -o FULL`, and install FULL). Any bundle's load streams
only the layers the engine does not have.

Re-running install is safe: it resumes a killed install, reports \"already installed\" when nothing
changed, and upgrades to a newer bundle restarting only changed services. It never runs
`down -v` and never removes volumes. Files you edited are kept; the bundle's version is written
beside them as NAME.bkbundle-new. Generated secrets live in TARGET/.env (mode 0600) and are never
printed. The journal of steps is TARGET/.bkbundle/journal.json.";

/// How to reach a registry: shared by push, install --images-from and doctor.
#[derive(Args, Debug, Clone, Default)]
pub struct RegistryAccessArgs {
    /// A PEM file of the CA that signs the registry's certificate (default: the system's CAs).
    #[arg(long, value_name = "FILE")]
    pub registry_ca: Option<PathBuf>,
    /// The registry speaks plain HTTP, without TLS (credentials and images cross the network unprotected).
    #[arg(long)]
    pub registry_insecure: bool,
    /// The registry user (default: what `docker login` stored, else anonymous).
    #[arg(long, value_name = "USER")]
    pub registry_user: Option<String>,
    /// A file whose first line is the registry password (else BKBUNDLE_REGISTRY_PASSWORD, else a prompt).
    #[arg(long, value_name = "FILE", requires = "registry_user")]
    pub registry_password_file: Option<PathBuf>,
}

impl RegistryAccessArgs {
    pub fn access(&self) -> bkbundle::registry::Access {
        bkbundle::registry::Access {
            ca_file: self.registry_ca.clone(),
            insecure: self.registry_insecure,
            username: self.registry_user.clone(),
            password_file: self.registry_password_file.clone(),
            prompt: std::io::IsTerminal::is_terminal(&std::io::stdin()),
        }
    }
}

pub const PUSH_HELP: &str = "\
Each image goes to REGISTRY/PREFIX/<its path>:<its tag>: bklite/server:3.1.0 pushed with
--registry harbor.intranet/bklite becomes harbor.intranet/bklite/bklite/server:3.1.0 (a
reference's own registry host is dropped). Layers are sent gzip-compressed (what every engine
pulls), recompressed from the bundle on the fly; --compression zstd sends a zstd bundle's layers
as they are stored (Docker 23+, containerd 1.5+). A blob the registry has is not sent again (HEAD,
or a mount from another repository); a manifest is pushed only once all its blobs are there. A
re-run sends nothing; a killed push resumes.

Credentials: --registry-user with --registry-password-file (or BKBUNDLE_REGISTRY_PASSWORD, or a
prompt), else what `docker login REGISTRY` stored ($DOCKER_CONFIG/config.json or
~/.docker/config.json), else anonymous. They are never printed.";

#[derive(Args, Debug)]
pub struct PushArgs {
    /// The bundle file, or the first part (NAME.001) of a split bundle.
    pub bundle: PathBuf,
    /// HOST[:PORT][/PREFIX] of the registry, e.g. harbor.intranet/bklite or 10.0.0.5:5000
    /// (default: the config's [registry] url).
    #[arg(long, value_name = "REGISTRY", required_unless_present = "config")]
    pub registry: Option<String>,
    /// An install config whose [registry] section gives the registry, its CA, user and password
    /// file (the command line wins).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Push only this image (a reference of the bundle's); repeat for several. Default: all.
    #[arg(long = "image", value_name = "REF")]
    pub images: Vec<String>,
    #[command(flatten)]
    pub access: RegistryAccessArgs,
    /// How layers are sent: gzip (recompressed when the bundle stores zstd) or zstd (as stored).
    #[arg(long, value_enum, default_value_t = CompressionArg::Gzip)]
    pub compression: CompressionArg,
    /// gzip level of recompressed layers (1-9): 1 pushes fastest; a higher level makes smaller
    /// layers, which every host then pulls a little faster.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=9))]
    pub level: u32,
    /// Blobs sent at once.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=16))]
    pub jobs: u64,
    /// The trusted minisign public key (.pub): the bundle must carry a signature by it.
    #[arg(long, value_name = "PUBKEY")]
    pub key: Option<PathBuf>,
    /// Wait up to this long for another push to the same registry from this host.
    #[arg(long, value_name = "SECS", default_value_t = 10, env = "BKBUNDLE_LOCK_WAIT")]
    pub lock_wait: u64,
}

#[derive(Args, Debug)]
pub struct InstallArgs {
    /// The bundle file, or the first part (NAME.001) of a split bundle.
    pub bundle: PathBuf,
    /// Where to lay out the stack (default: the config's `target`, else /opt/<bundle name>).
    #[arg(long, value_name = "DIR")]
    pub target: Option<PathBuf>,
    /// The install config (TOML): site values, ports, health deadline.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Print the plan (images, files, services, preflight) and change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Refuse a bundle that is not signed by --key.
    #[arg(long, requires = "key")]
    pub require_signature: bool,
    /// The trusted minisign public key (.pub): the bundle must carry a signature by it.
    #[arg(long, value_name = "PUBKEY")]
    pub key: Option<PathBuf>,
    /// Health deadline in seconds (overrides the config's).
    #[arg(long, value_name = "SECS")]
    pub timeout: Option<u64>,
    /// How long to wait for another bkbundle run's lock on the target before giving up (exit 11).
    #[arg(long, value_name = "SECS", default_value_t = 10, env = "BKBUNDLE_LOCK_WAIT")]
    pub lock_wait: u64,
    /// Upgrading a running site: do not back it up first (by default install writes a backup
    /// into TARGET/backups, keeping the last [backup] keep of the config, 3 by default).
    #[arg(long)]
    pub no_backup: bool,
    /// Pull the images from this registry (HOST[:PORT][/PREFIX], where `push` put them) instead
    /// of loading them from the bundle; needed for a bundle packed with --no-images. Default: the
    /// config's [registry] url.
    #[arg(long, value_name = "REGISTRY")]
    pub images_from: Option<String>,
    #[command(flatten)]
    pub registry: RegistryAccessArgs,
}

pub const BACKUP_HELP: &str = "\
One file (mode 0600: it holds the site's secrets) with everything needed to bring the site back,
here or on a new host: every database of the stack's PostgreSQL (dumped by the pg_dump of the
image the stack runs, through the Docker Engine API, streamed and compressed with zstd), every
object of every NATS object store bucket with its name, description and digest, the target's
files (compose file, .env, certificates and the site CA's key, the install journal), and a
manifest (backup.toml) with every member's size and SHA-256: `sha256sum -c SHA256SUMS` works
after `tar -x`. The site keeps running while it is taken. Nothing is staged: the file is written
under NAME.partial and renamed when complete.

  bkbundle backup --target /opt/bklite -o /mnt/usb/site-2026-12-07.bkbak
  bkbundle backup verify /mnt/usb/site-2026-12-07.bkbak
  bkbundle backup inspect /mnt/usb/site-2026-12-07.bkbak

Encrypted (--encrypt with a passphrase, or --recipient age1... for age keys): every member is an
age stream to a key of the backup's own, itself encrypted with the passphrase or to the
recipients; `backup verify` checks the stored bytes without the passphrase and, given it, opens
every member. Without encryption, keep the file as you keep the site's secrets.

The database service is `postgres` unless the install config says [backup] database_service.
Install backs a running site up by itself before it upgrades it (see install --no-backup).";

pub const RESTORE_HELP: &str = "\
Restore needs the bundle the site ran when the backup was taken (the backup names it: `bkbundle
backup inspect FILE`). Into an empty directory (a new host, or after `docker compose down -v`
wiped the volumes) it runs without asking; over an existing site it says what it would replace
and stops, unless --force (the site there is then backed up first into TARGET/backups, unless
--no-backup). Order: verify the backup and the bundle; write the site files; load the bundle's
images; stop a running stack (never `down -v`); start the database service alone and restore each
database in one transaction; start the stack and wait on health; upload the objects (one already
there with its digest is not sent); write the install journal; run doctor's checks. Killed at any
point, the same command again completes it.

  bkbundle restore site-2026-12-07.bkbak --bundle bklite-3.1.0.bkb --target /opt/bklite
  bkbundle restore site-2026-12-07.bkbak --bundle bklite-3.1.0.bkb --target /opt/bklite2 --project bklite2";

#[derive(Args, Debug)]
pub struct BackupArgs {
    #[command(subcommand)]
    pub command: Option<BackupCommand>,
    /// The install's directory, e.g. /opt/bklite.
    #[arg(long, value_name = "DIR", required = true)]
    pub target: Option<PathBuf>,
    /// The backup file (default: TARGET/backups/site-<time>.bkbak).
    #[arg(short, long, value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// The install config (TOML): [nats], [backup] database_service, [env].
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The compose project (default: the install journal's).
    #[arg(long, value_name = "NAME")]
    pub project: Option<String>,
    /// NATS server(s) (default: NATS_URL, [nats] url, the stack's .env).
    #[arg(long, value_name = "URL")]
    pub nats_url: Option<String>,
    /// Sign the manifest with this minisign secret key (password from BKBUNDLE_SIGN_PASSWORD or a prompt).
    #[arg(long, value_name = "KEY")]
    pub sign: Option<PathBuf>,
    /// Encrypt every member with a passphrase (age, scrypt): from --passphrase-file, else
    /// BKBUNDLE_BACKUP_PASSPHRASE, else asked twice on the terminal.
    #[arg(long, conflicts_with = "recipient")]
    pub encrypt: bool,
    /// With --encrypt: read the passphrase from the first line of this file.
    #[arg(long, value_name = "FILE", requires = "encrypt")]
    pub passphrase_file: Option<PathBuf>,
    /// Encrypt every member to this age recipient (age1..., repeatable); restore then needs one
    /// of their identity files (--identity).
    #[arg(long, value_name = "AGE1...")]
    pub recipient: Vec<String>,
    /// How long to wait for another bkbundle run's lock on the target before giving up (exit 11).
    #[arg(long, value_name = "SECS", default_value_t = 10, env = "BKBUNDLE_LOCK_WAIT")]
    pub lock_wait: u64,
}

/// What opens an encrypted backup (restore, backup verify).
#[derive(Args, Debug, Default)]
pub struct UnlockArgs {
    /// The passphrase of an encrypted backup, from the first line of this file (else
    /// BKBUNDLE_BACKUP_PASSPHRASE, else asked on the terminal).
    #[arg(long, value_name = "FILE", conflicts_with = "identity")]
    pub passphrase_file: Option<PathBuf>,
    /// An age identity file (AGE-SECRET-KEY-1...) of a recipient the backup was encrypted to
    /// (repeatable).
    #[arg(long, value_name = "FILE")]
    pub identity: Vec<PathBuf>,
}

#[derive(Subcommand, Debug)]
pub enum BackupCommand {
    /// Check every member of a backup (and its signature) without changing anything; with its
    /// passphrase or identity, open every member too.
    Verify {
        /// The backup file.
        file: PathBuf,
        /// The trusted minisign public key (.pub): the backup must carry a signature by it.
        #[arg(long, value_name = "PUBKEY")]
        key: Option<PathBuf>,
        #[command(flatten)]
        unlock: UnlockArgs,
    },
    /// Show what a backup holds: the site, the bundle it needs, databases, buckets, sizes.
    Inspect {
        /// The backup file.
        file: PathBuf,
    },
}

#[derive(Args, Debug)]
pub struct RestoreArgs {
    /// The backup file.
    pub backup: PathBuf,
    /// The bundle the backed-up site ran (the backup names it by id).
    #[arg(long, value_name = "BUNDLE")]
    pub bundle: PathBuf,
    /// Where to restore the site (an empty directory, or the site's own with --force).
    #[arg(long, value_name = "DIR")]
    pub target: PathBuf,
    /// The compose project to run it as (default: the backup's).
    #[arg(long, value_name = "NAME")]
    pub project: Option<String>,
    /// The install config (TOML): [health], [nats], [backup].
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Replace the site at the target (its files, its stack's state, its databases).
    #[arg(long)]
    pub force: bool,
    /// With --force: do not back the replaced site up first.
    #[arg(long)]
    pub no_backup: bool,
    /// The trusted minisign public key (.pub): the backup must carry a signature by it.
    #[arg(long, value_name = "PUBKEY")]
    pub key: Option<PathBuf>,
    #[command(flatten)]
    pub unlock: UnlockArgs,
    /// How long to wait for another bkbundle run's lock on the target before giving up (exit 11).
    #[arg(long, value_name = "SECS", default_value_t = 10, env = "BKBUNDLE_LOCK_WAIT")]
    pub lock_wait: u64,
}

pub const REGIONS_HELP: &str = "\
Every region's env is the bundle's defaults ([regions] of its manifest), overridden by the
install config; `${NAME}` placeholders are filled from the config's [env] over the stack's .env
(--env-file). A region other than `default` inherits the keys it does not set from `default`,
with the host of NODE_SERVER_URL and NATS_SERVERS replaced by its proxy_address. Regions in the
database but not in the config are checked and left alone. In the install config:
  [database]
  url = \"postgres://${POSTGRES_USER}:${POSTGRES_PASSWORD}@127.0.0.1:${POSTGRES_PORT}/${POSTGRES_DB}\"
  secret_key_env = \"SECRET_KEY\"        # the server's SECRET_KEY encrypts *PASSWORD* keys
  redis_url = \"redis://:${REDIS_PASSWORD}@127.0.0.1:${REDIS_PORT}/1\"   # the server's cache
  [[regions]]
  name = \"east\"
  proxy_address = \"10.1.0.9\"          # a host: agents of this region reach the platform there
  local = false                       # true allows loopback URLs (agents on this very host)
  [regions.env]
  STARGAZER_URL = \"http://10.1.0.9:8083\"

The database: --database-url, else DATABASE_URL, else [database] url, else the PG* variables
(PGHOST PGPORT PGUSER PGPASSWORD PGDATABASE), else the stack's .env (POSTGRES_* on its
INTERNAL_BIND_IP, 127.0.0.1 by default). The server's Redis cache: [database] redis_url, else the
stack's (REDIS_PASSWORD and REDIS_PORT of its .env, db 1).
`apply` writes in one transaction, leaves rows that are already right alone (secrets are compared
decrypted), and removes the server's cached env of the regions it changed. Secret values are
never printed.";

#[derive(Args, Debug)]
pub struct RegionsArgs {
    #[command(subcommand)]
    pub command: RegionsCommand,
}

#[derive(Subcommand, Debug)]
pub enum RegionsCommand {
    /// Validate every region's env (every problem at once); with --database-url also the regions
    /// already in the live database (read only).
    Check(RegionsCheckArgs),
    /// Seed every region's env in the platform's PostgreSQL (one transaction).
    Apply(RegionsApplyArgs),
}

#[derive(Args, Debug)]
pub struct RegionsCommon {
    /// The bundle whose region defaults apply (its required keys and default values).
    #[arg(long, value_name = "BUNDLE")]
    pub bundle: PathBuf,
    /// The install config (TOML): [[regions]], [env], [database].
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The stack's rendered .env (e.g. /opt/bklite/.env): site values such as HOST_IP, the
    /// generated NATS passwords and SECRET_KEY.
    #[arg(long, value_name = "PATH")]
    pub env_file: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct RegionsCheckArgs {
    #[command(flatten)]
    pub common: RegionsCommon,
    /// Also check the regions already in this live database (postgres://USER:PASSWORD@HOST:PORT/DB):
    /// e.g. a region created in the UI without NODE_SERVER_URL. Nothing is written.
    #[arg(long, value_name = "URL")]
    pub database_url: Option<String>,
}

#[derive(Args, Debug)]
pub struct RegionsApplyArgs {
    #[command(flatten)]
    pub common: RegionsCommon,
    /// The platform's database, postgres://USER:PASSWORD@HOST:PORT/DB (default: DATABASE_URL,
    /// [database] url, the PG* variables, the stack's .env).
    #[arg(long, value_name = "URL")]
    pub database_url: Option<String>,
    /// Show what would be created, updated or left unchanged, and write nothing.
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Args, Debug)]
pub struct MergeArgs {
    /// The base bundle: the one the delta was packed against (`bkbundle inspect DELTA` names it).
    pub base: PathBuf,
    /// The delta bundle.
    pub delta: PathBuf,
    /// Where to write the full bundle.
    #[arg(short, long, value_name = "BUNDLE")]
    pub output: PathBuf,
    /// Require both bundles to be signed by this minisign public key.
    #[arg(long, value_name = "PUBKEY")]
    pub key: Option<PathBuf>,
    /// Sign the full bundle's manifest with this minisign secret key (password from
    /// BKBUNDLE_SIGN_PASSWORD or a prompt); its manifest differs from the delta's, so the
    /// delta's signature cannot carry over.
    #[arg(long, value_name = "KEY")]
    pub sign: Option<PathBuf>,
    /// Cut the bundle into numbered parts of at most this size.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub split_size: Option<u64>,
}

#[derive(Args, Debug)]
pub struct InspectArgs {
    /// The bundle file, or the first part (NAME.001) of a split bundle.
    pub bundle: PathBuf,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
pub enum CompressionArg {
    Zstd,
    Gzip,
}

/// Parse `4G`, `700M`, `4GiB`, `123456`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size like 4G, 700M or 4GiB"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1_000,
        "m" | "mb" => 1_000_000,
        "g" | "gb" => 1_000_000_000,
        "t" | "tb" => 1_000_000_000_000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "tib" => 1 << 40,
        u => {
            return Err(format!(
                "unknown size unit {u:?} in {s:?} (use K, M, G, T or KiB, MiB, GiB)"
            ))
        }
    };
    let v = n.checked_mul(mult).ok_or_else(|| format!("{s:?} is too large"))?;
    if v < 1_000_000 {
        return Err(format!("{s:?} is below the 1M minimum part size"));
    }
    Ok(v)
}

// ---------------------------------------------------------------------------------------------
// Arguments into the library's options (the commands that need files read first, the site's
// config and .env, are turned into options in `main`).

impl From<PackArgs> for pack::PackOptions {
    fn from(a: PackArgs) -> Self {
        pack::PackOptions {
            recipe: a.recipe,
            output: a.output,
            compression: a.compression.into(),
            level: a.level,
            split_size: a.split_size,
            sign_key: a.sign,
            threads: a.threads,
            binary: a.binary,
            no_images: a.no_images,
            base: match (a.base, a.base_manifest) {
                (Some(b), _) => Some(bkbundle::delta::BaseSource::Bundle(b)),
                (None, Some(m)) => Some(bkbundle::delta::BaseSource::Manifest(m)),
                (None, None) => None,
            },
            mirror: a.mirror,
            access: a.access.access(),
            recompress: a.recompress,
        }
    }
}

impl From<CompressionArg> for Compression {
    fn from(c: CompressionArg) -> Self {
        match c {
            CompressionArg::Zstd => Compression::Zstd,
            CompressionArg::Gzip => Compression::Gzip,
        }
    }
}

impl From<VerifyArgs> for verify::VerifyOptions {
    fn from(a: VerifyArgs) -> Self {
        verify::VerifyOptions {
            bundle: a.bundle,
            require_signature: a.require_signature,
            key: a.key,
            threads: a.threads,
        }
    }
}

impl From<InstallArgs> for install::InstallOptions {
    fn from(a: InstallArgs) -> Self {
        install::InstallOptions {
            bundle: a.bundle,
            target: a.target,
            config: a.config,
            dry_run: a.dry_run,
            require_signature: a.require_signature,
            key: a.key,
            timeout_secs: a.timeout,
            lock_wait: Some(std::time::Duration::from_secs(a.lock_wait)),
            no_backup: a.no_backup,
            images_from: a.images_from,
            registry: a.registry.access(),
        }
    }
}

impl InitPackagesArgs {
    /// `--type`, `--os`, `--arch`, `--object` and `--version`: what every file of `--dir` is.
    pub fn overrides(&self) -> packages::dir::Overrides {
        packages::dir::Overrides {
            kind: self.kind.map(Into::into),
            os: self.os.map(Into::into),
            arch: self.arch.clone(),
            object: self.object.clone(),
            version: self.version.clone(),
        }
    }
}

impl From<PackageTypeArg> for PackageType {
    fn from(t: PackageTypeArg) -> Self {
        match t {
            PackageTypeArg::Controller => PackageType::Controller,
            PackageTypeArg::Collector => PackageType::Collector,
        }
    }
}

impl From<OsArg> for Os {
    fn from(o: OsArg) -> Self {
        match o {
            OsArg::Linux => Os::Linux,
            OsArg::Windows => Os::Windows,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4G").unwrap(), 4_000_000_000);
        assert_eq!(parse_size("4GiB").unwrap(), 4 << 30);
        assert_eq!(parse_size("700M").unwrap(), 700_000_000);
        assert!(parse_size("4X").is_err());
        assert!(parse_size("10").is_err());
    }

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn help_lists_every_exit_code_within_the_width() {
        let help = Cli::command().render_help().to_string();
        let table = exit_codes_help();
        assert!(help.contains(&table), "{help}");
        assert!(
            table.starts_with("Exit codes:\n  0  success\n  1  internal error"),
            "{table}"
        );
        assert!(table.contains("\n 11  another bkbundle run holds the lock"), "{table}");
        for d in bkbundle::error::EXIT_CODES {
            assert!(
                table.contains(&format!("\n{:>3}  ", d.code)),
                "{} missing:\n{table}",
                d.code
            );
        }
        assert!(table.lines().all(|l| l.len() <= HELP_WIDTH), "{table}");
    }
}

const INIT_PACKAGES_HELP: &str = "\
Every package of the bundle (controller, and each collector, whose bytes are taken from the
controller package when the record points into it) is uploaded to the JetStream object store
(the stack's NATS_NAMESPACE, else the database release's default: `bk_lite` before 2026, `bklite`
since; created when absent) under the key layout that release reads (with the architecture exactly
when node_mgmt_packageversion has cpu_architecture), and gets its row (object first, then the row),
written with the columns the release has. An object whose
digest equals the file's SHA-256 is skipped (nothing is sent); a different object under a fixed
version is a conflict that needs --force (version `latest` is always replaced). Rows whose object is
missing are repaired from the bundle; objects without rows are reported.

With --dir DIR instead of --bundle, every file directly in DIR is a package, recognised by its name
the way the server parses an uploaded file: `telegraf-1.28.3-linux-amd64.tar.gz` is object Telegraf
(a collector), version 1.28.3, linux, x86_64; `fusion-collectors-...` is the Controller. --os,
--arch, --object, --version and --type override the name for every file; a file whose name does not
tell its version, OS or architecture is an error that names it.

The install config's [nats] (url, user, password, token, credentials, ca_file, cert_file, key_file,
bucket) says how to reach NATS; default: the stack's .env (NATS_PORT, NATS_USER, NATS_PASSWORD).
`bkbundle install` runs this step itself after the stack is healthy.";

#[derive(ValueEnum, Clone, Copy, Debug)]
pub enum OsArg {
    Linux,
    Windows,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
pub enum PackageTypeArg {
    Controller,
    Collector,
}

#[derive(Args, Debug)]
pub struct InitPackagesArgs {
    /// Upload every package found (of the bundle, or of --dir), without asking.
    #[arg(long)]
    pub auto: bool,
    /// The bundle holding the packages.
    #[arg(long, value_name = "BUNDLE", conflicts_with = "dir", required_unless_present = "dir")]
    pub bundle: Option<PathBuf>,
    /// A directory of package files instead of a bundle (recognised by name; see below).
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
    /// With --dir: the OS of every file.
    #[arg(long, value_enum, requires = "dir")]
    pub os: Option<OsArg>,
    /// With --dir: the CPU architecture of every file (x86_64/amd64, arm64/aarch64).
    #[arg(long, value_name = "ARCH", requires = "dir")]
    pub arch: Option<String>,
    /// With --dir: the object of every file (Controller, Telegraf, Vector, NATS-Executor, ...).
    #[arg(long, value_name = "OBJECT", requires = "dir")]
    pub object: Option<String>,
    /// With --dir: the version of every file.
    #[arg(long, value_name = "VERSION", requires = "dir")]
    pub version: Option<String>,
    /// With --dir: the type of every file.
    #[arg(long = "type", value_enum, requires = "dir")]
    pub kind: Option<PackageTypeArg>,
    /// Replace different objects under fixed versions and overwrite their rows.
    #[arg(long)]
    pub force: bool,
    /// Read the database and the bucket, report what would happen, write nothing.
    #[arg(long)]
    pub dry_run: bool,
    #[command(flatten)]
    pub site: SiteArgs,
}

const DOCTOR_HELP: &str = "\
Runs the field's diagnosis chains against the live install and prints one finding per problem:
severity, what it is about (region and key, package row, object, container), the evidence (the
row, the object key, the log line, the probe's answer) and the fix as a command.

  containers  the compose project's containers: exited, dead, unhealthy, restart loops, and log
              lines of known causes (name resolution, package index, Server-url is not valid,
              connection refused, password mismatch, ...)
  regions     every region's sidecar env: required keys, `null`, URLs, loopback; the server URL's
              host resolves and its port accepts TCP from this host; the server's cached env
              (django_cache, and Redis from [database] redis_url or the stack's .env) differing
              from the rows
  nats        name resolution -> TCP -> TLS -> authentication -> JetStream -> bucket, naming the
              first broken link
  packages    an empty package list; rows whose object is missing (downloads 404); objects without
              rows; with --bundle, stored objects that differ from the bundle's
  agents      install tasks that succeeded while no node of that host ever registered

--fix applies only safe repairs and reports each: re-upload missing objects from --bundle, add a
region's missing keys from the default region's rows (its proxy address applied), remove a stale
cache entry. Nothing else is changed.

Where things are: --target (default [target] of --config) holds the stack's .env and the install
journal (the compose project); the database and NATS are found as for init-packages.

On an agent host (copy the tool there from the bundle: `tar -xf BUNDLE bin/bkbundle`), `doctor
--agent [--install-dir /opt/fusion-collectors]` diagnoses why this node never appeared, read-only
and with no configuration: the agent's config (server_url, node id, token, CA), the sidecar
service (systemctl, journal), the server (DNS, TCP, HTTP, TLS, clock skew), NATS as the agent
connects, and the host (disk, inodes, memory, collector binaries).
Exit 0 when no error-severity finding remains, 10 otherwise (other codes: bkbundle itself failed).";

#[derive(Args, Debug)]
pub struct DoctorArgs {
    /// Diagnose this agent host instead of the platform (see below); reads only the agent's files.
    #[arg(long, conflicts_with_all = ["bundle", "target", "project", "fix", "config", "env_file", "database_url", "nats_url", "bucket"])]
    pub agent: bool,
    /// With --agent: where the agent is installed.
    #[arg(long, value_name = "DIR", requires = "agent", default_value = None)]
    pub install_dir: Option<PathBuf>,
    /// The installed bundle: its required region keys, its packages (compared with the stored
    /// objects; re-uploaded by --fix), its compose project.
    #[arg(long, value_name = "BUNDLE")]
    pub bundle: Option<PathBuf>,
    /// The install's directory (its .env and journal), e.g. /opt/bklite.
    #[arg(long, value_name = "DIR")]
    pub target: Option<PathBuf>,
    /// The compose project (default: the install journal's).
    #[arg(long, value_name = "NAME")]
    pub project: Option<String>,
    #[command(flatten)]
    pub site: SiteArgs,
    /// Apply the safe repairs (see below) and report each.
    #[arg(long)]
    pub fix: bool,
    /// How to reach the registry the images came from (the install journal's, or the config's
    /// [registry] url), which doctor checks holds every image of the bundle.
    #[command(flatten)]
    pub registry: RegistryAccessArgs,
}

/// Where the live platform is: the install config, the stack's .env, the database and NATS
/// (init-packages and doctor).
#[derive(Args, Debug)]
pub struct SiteArgs {
    /// The install config (TOML): target, project, [[regions]], [env], [database], [nats].
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The stack's rendered .env (NATS_*, POSTGRES_*, INTERNAL_BIND_IP, REDIS_*); doctor
    /// defaults to TARGET/.env.
    #[arg(long, value_name = "PATH")]
    pub env_file: Option<PathBuf>,
    /// The platform's database, postgres://USER:PASSWORD@HOST:PORT/DB (default: DATABASE_URL,
    /// [database] url, the PG* variables, the stack's .env).
    #[arg(long, value_name = "URL")]
    pub database_url: Option<String>,
    /// NATS server(s), comma-separated: nats://[USER:PASSWORD@]HOST:PORT or tls://... (default:
    /// NATS_URL, [nats] url, the stack's .env).
    #[arg(long, value_name = "URL")]
    pub nats_url: Option<String>,
    /// The object store bucket (default: [nats] bucket, else the stack's NATS_NAMESPACE, else the release's default).
    #[arg(long, value_name = "NAME")]
    pub bucket: Option<String>,
}
