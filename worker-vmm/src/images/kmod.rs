//! Kernel modules for the initramfs: the recipe's modules and their dependencies from
//! `modules.dep`, in load order (dependencies first), built-in ones skipped.

use std::collections::{HashMap, HashSet};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ModuleError {
    #[error("kernel module {0:?} is neither in modules.dep nor built in")]
    Unknown(String),
}

/// `virtio-rng`, `virtio_rng` and `kernel/.../virtio-rng.ko.xz` all name `virtio_rng`.
pub fn module_name(path_or_name: &str) -> String {
    let base = path_or_name.rsplit('/').next().unwrap_or(path_or_name);
    let base = base.split(".ko").next().unwrap_or(base);
    base.replace('-', "_")
}

/// Module paths (relative to the modules folder) to load, in order, for `wanted`.
pub fn load_order(
    modules_dep: &str,
    modules_builtin: &str,
    wanted: &[String],
) -> Result<Vec<String>, ModuleError> {
    let mut deps: HashMap<String, (String, Vec<String>)> = HashMap::new();
    for line in modules_dep.lines() {
        let Some((path, rest)) = line.split_once(':') else {
            continue;
        };
        let needs = rest.split_whitespace().map(str::to_owned).collect();
        deps.insert(module_name(path), (path.to_owned(), needs));
    }
    let builtin: HashSet<String> = modules_builtin.lines().map(module_name).collect();
    let mut order = Vec::new();
    let mut seen = HashSet::new();
    for name in wanted {
        let name = module_name(name);
        if deps.contains_key(&name) {
            visit(&name, &deps, &mut seen, &mut order);
        } else if !builtin.contains(&name) {
            return Err(ModuleError::Unknown(name));
        }
    }
    Ok(order)
}

fn visit(
    name: &str,
    deps: &HashMap<String, (String, Vec<String>)>,
    seen: &mut HashSet<String>,
    order: &mut Vec<String>,
) {
    if !seen.insert(name.to_owned()) {
        return;
    }
    let Some((path, needs)) = deps.get(name) else {
        return;
    };
    // modules.dep lists a module's dependencies with the deepest last: load from the end.
    for need in needs.iter().rev() {
        visit(&module_name(need), deps, seen, order);
    }
    order.push(path.clone());
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEP: &str = "kernel/drivers/virtio/virtio_mmio.ko.xz: kernel/drivers/virtio/virtio.ko.xz kernel/drivers/virtio/virtio_ring.ko.xz
kernel/drivers/virtio/virtio.ko.xz: kernel/drivers/virtio/virtio_ring.ko.xz
kernel/drivers/virtio/virtio_ring.ko.xz:
kernel/drivers/block/virtio_blk.ko.xz: kernel/drivers/virtio/virtio.ko.xz kernel/drivers/virtio/virtio_ring.ko.xz
kernel/drivers/char/hw_random/virtio-rng.ko.xz: kernel/drivers/virtio/virtio.ko.xz kernel/drivers/virtio/virtio_ring.ko.xz
";
    const BUILTIN: &str = "kernel/fs/ext4/ext4.ko\nkernel/drivers/char/hw_random/rng-core.ko\n";

    #[test]
    fn test_load_order_puts_dependencies_first_once() {
        let wanted = ["virtio_mmio", "virtio_blk", "virtio-rng", "ext4"].map(String::from);
        let order = load_order(DEP, BUILTIN, &wanted).unwrap();
        let names: Vec<_> = order.iter().map(|p| module_name(p)).collect();
        assert_eq!(
            names,
            [
                "virtio_ring",
                "virtio",
                "virtio_mmio",
                "virtio_blk",
                "virtio_rng"
            ]
        );
    }

    #[test]
    fn test_unknown_modules_are_refused() {
        let err = load_order(DEP, BUILTIN, &["no_such".to_owned()]).unwrap_err();
        assert_eq!(err, ModuleError::Unknown("no_such".into()));
    }
}
