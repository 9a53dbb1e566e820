//! Guest images: recipes (`configs/images/*.toml`), their build (`vmfarm images build`) and
//! the images directory (`vmfarm images list`). See DESIGN.md "Guest images".

pub mod build;
pub mod cpio;
pub mod firmware_disk;
pub mod import;
pub mod initrd;
pub mod kmod;
pub mod manifest;
pub mod recipe;
pub mod rootfs;
pub mod tools;

use std::path::{Path, PathBuf};

pub use build::{BuildOptions, BuildReport, build};
pub use manifest::{ImageManifest, InstalledImage, current, list, make_current};
pub use recipe::Recipe;

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{tool} is not installed: install the Debian package {package}")]
    MissingTool {
        tool: &'static str,
        package: &'static str,
    },
    #[error(
        "building images needs root (mmdebstrap's root mode keeps the files' owners for mkfs.ext4 -d): \
         run it as root or with sudo"
    )]
    NotRoot,
    #[error("the package {0:?} does not exist in the recipe's suite: fix the recipe's packages")]
    UnknownPackage(String),
    #[error(
        "no space left on the device: free some space or point VMFARM_CACHE / --images-dir elsewhere ({0})"
    )]
    NoSpace(String),
    #[error("{tool} failed:\n{log}")]
    ToolFailed { tool: String, log: String },
    #[error(transparent)]
    Recipe(#[from] recipe::RecipeError),
    #[error("the recipe's kernel modules")]
    Module(#[from] kmod::ModuleError),
    #[error("the agent {path}: {reason}")]
    Agent { path: PathBuf, reason: String },
    #[error("{0}")]
    Rootfs(String),
    #[error("{path}: {message}")]
    BadManifest { path: PathBuf, message: String },
    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl ImageError {
    pub fn io(path: &Path, source: std::io::Error) -> ImageError {
        if source.kind() == std::io::ErrorKind::StorageFull {
            return ImageError::NoSpace(path.display().to_string());
        }
        ImageError::Io {
            path: path.to_owned(),
            source,
        }
    }
}

/// `vmfarm images ...`
#[derive(Debug, clap::Args)]
pub struct ImagesArgs {
    #[command(subcommand)]
    pub command: ImagesCommand,
}

#[derive(Debug, clap::Subcommand)]
pub enum ImagesCommand {
    /// Build an image from a recipe (a name in the recipes folder, or a .toml path).
    Build(BuildArgs),
    /// List the images in the images directory.
    List(ListArgs),
    /// Bring in a disk image that boots by firmware (a distribution's cloud image): checked,
    /// then copied into the images directory as a read-only base.
    Import(import::ImportArgs),
}

#[derive(Debug, clap::Args)]
pub struct BuildArgs {
    /// The recipe: `debian-12`, `tiny`, ... or a path to a recipe file.
    pub recipe: String,
    #[command(flatten)]
    pub dir: ImagesDirArg,
    /// The folder of recipes (default: `configs/images` of a source checkout, else the
    /// package's /usr/share/vmfarm/images).
    #[arg(long, env = "VMFARM_RECIPES")]
    pub recipes: Option<PathBuf>,
    /// The static guest agent (default: `vmfarm-agent` beside this program, else the package's
    /// /usr/lib/vmfarm/vmfarm-agent).
    #[arg(long, env = "VMFARM_AGENT")]
    pub agent: Option<PathBuf>,
    /// Print the image as JSON (`dir`, `reused`, `seconds` and its `image.toml` as `manifest`).
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct ListArgs {
    #[command(flatten)]
    pub dir: ImagesDirArg,
    /// Print a JSON array of the images (`dir`, `current`, and each `image.toml` as `manifest`).
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct ImagesDirArg {
    /// The images directory (default: `<data dir>/images`, the data dir being $VMFARM_DATA or ./vmfarm-data).
    #[arg(long)]
    pub images_dir: Option<PathBuf>,
}

impl ImagesDirArg {
    pub fn resolve(&self) -> PathBuf {
        self.images_dir.clone().unwrap_or_else(|| {
            std::env::var_os("VMFARM_DATA")
                .map_or_else(|| PathBuf::from("vmfarm-data"), PathBuf::from)
                .join("images")
        })
    }
}

/// `$VMFARM_CACHE`, else `~/.cache/vmfarm`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("VMFARM_CACHE") {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/tmp"), PathBuf::from);
    home.join(".cache/vmfarm")
}

/// Where the Debian package puts the guest agent and the recipes.
const INSTALLED_AGENT: &str = "/usr/lib/vmfarm/vmfarm-agent";
const INSTALLED_RECIPES: &str = "/usr/share/vmfarm/images";

/// The guest agent when none is given: beside this program (a build), else the package's.
pub fn default_agent() -> anyhow::Result<PathBuf> {
    use anyhow::Context as _;
    let exe = std::env::current_exe()?;
    let beside = exe.with_file_name("vmfarm-agent");
    [beside.clone(), PathBuf::from(INSTALLED_AGENT)]
        .into_iter()
        .find(|agent| agent.is_file())
        .with_context(|| {
            format!(
                "no guest agent at {} or {INSTALLED_AGENT}: build it with `cargo build -p vmfarm-agent \
                 --release --target x86_64-unknown-linux-musl` and pass --agent (or VMFARM_AGENT)",
                beside.display()
            )
        })
}

/// The recipes when no folder is given: `configs/images` of the working directory (a source
/// checkout), else the package's.
pub fn default_recipes() -> PathBuf {
    let checkout = PathBuf::from("configs/images");
    if checkout.is_dir() || !Path::new(INSTALLED_RECIPES).is_dir() {
        checkout
    } else {
        PathBuf::from(INSTALLED_RECIPES)
    }
}

/// Runs `vmfarm images ...`.
pub fn run(args: ImagesArgs) -> anyhow::Result<()> {
    use anyhow::Context as _;
    match args.command {
        ImagesCommand::Build(args) => {
            let recipes = args.recipes.unwrap_or_else(default_recipes);
            let recipe = Recipe::load(&args.recipe, &recipes)?;
            let agent = match args.agent {
                Some(agent) => agent,
                None => default_agent()?,
            };
            let options = BuildOptions {
                images_dir: args.dir.resolve(),
                cache_dir: cache_dir(),
                agent,
            };
            let report = build(&recipe, &options, &mut |step| {
                eprintln!("{}: {step}", recipe.name)
            })
            .with_context(|| format!("building image {}", recipe.name))?;
            let m = &report.image.manifest;
            if args.json {
                let json = serde_json::json!({
                    "dir": report.image.dir, "reused": report.reused, "seconds": report.seconds,
                    "manifest": m,
                });
                println!("{}", serde_json::to_string_pretty(&json)?);
                return Ok(());
            }
            let state = if report.reused { "up to date" } else { "built" };
            println!(
                "{} {} {state} in {:.1} s: {} ({} {}), kernel {}, {}",
                m.name,
                m.version,
                report.seconds,
                m.system.pretty_name,
                m.system.os,
                m.system.release,
                m.system.kernel_version,
                report.image.dir.display()
            );
        }
        ImagesCommand::Import(args) => {
            let image = import::import(&args, &mut |step| eprintln!("{}: {step}", args.name))
                .with_context(|| {
                    format!("importing {} as image {}", args.disk.display(), args.name)
                })?;
            println!(
                "{} {} imported: {} by {:?} firmware, build user {}, {}",
                image.manifest.name,
                image.manifest.version,
                image.manifest.system.pretty_name,
                image.firmware().unwrap_or(recipe::Firmware::Uefi),
                image.user(),
                image.dir.display()
            );
        }
        ImagesCommand::List(args) => {
            let dir = args.dir.resolve();
            let images = list(&dir)?;
            let current = current(&dir)?;
            let runs = |image: &InstalledImage| {
                current
                    .get(&image.manifest.name)
                    .is_some_and(|c| c.manifest.version == image.manifest.version)
            };
            if args.json {
                let json: Vec<_> = images
                    .iter()
                    .map(|image| {
                        serde_json::json!({
                            "dir": image.dir, "current": runs(image), "manifest": image.manifest,
                        })
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&json)?);
                return Ok(());
            }
            if images.is_empty() {
                println!(
                    "no images in {} (make one with `vmfarm images build RECIPE`)",
                    dir.display()
                );
            }
            println!(
                "{:<16} {:<14} {:<10} {:<8} {:<24} {:>10}",
                "NAME", "VERSION", "OS", "RELEASE", "KERNEL", "SIZE"
            );
            for image in &images {
                let m = &image.manifest;
                let size: u64 = m.files.values().map(|f| f.size).sum();
                println!(
                    "{:<16} {:<14} {:<10} {:<8} {:<24} {:>7} MiB{}",
                    m.name,
                    m.version,
                    m.system.os,
                    m.system.release,
                    m.system.kernel_version,
                    size >> 20,
                    if runs(image) {
                        "  (jobs run this one)"
                    } else {
                        ""
                    }
                );
            }
        }
    }
    Ok(())
}
