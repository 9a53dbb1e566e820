//! Which config file `vmfarm server` and `vmfarm worker` read: `--config`, else
//! `$VMFARM_CONFIG`, else the installed one (`/etc/vmfarm/server.toml`, `worker.toml`, from the
//! package) when there is one, else none (the defaults).

use std::path::{Path, PathBuf};

/// Where the package installs the config files.
const INSTALLED: &str = "/etc/vmfarm";

/// The config file to read: `given` (the flag or the variable), else the installed `name`.
pub fn chosen(given: Option<&Path>, name: &str) -> Option<PathBuf> {
    given.map(Path::to_owned).or_else(|| {
        let installed = Path::new(INSTALLED).join(name);
        installed.is_file().then_some(installed)
    })
}
