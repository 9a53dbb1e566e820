//! Which backend boots guests on this host, decided once at start and explained in the log.

use crate::backend::Backend;
use crate::backend::jail::Jailer;
use crate::backend::kvm::KvmBackend;
use crate::backend::qemu::{Accel, QemuBackend};
use crate::config::BackendChoice;
use std::path::Path;
use std::sync::Arc;

/// What /dev/kvm offers on this host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvmHost {
    /// No usable /dev/kvm.
    Absent,
    /// PVM (kvm_pvm): guest ring-0 code is emulated; stock kernels crawl and die there.
    Pvm,
    /// Hardware virtualization.
    Hardware,
}

pub fn probe_kvm() -> KvmHost {
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        return KvmHost::Absent;
    }
    if Path::new("/sys/module/kvm_pvm").exists() {
        return KvmHost::Pvm;
    }
    KvmHost::Hardware
}

/// The backend for `choice` on a host with `kvm`, and why. `vmm` is the `vmfarm` binary that
/// runs `vm run` for the integrated VMM.
/// `jail` jails each guest's VMM process (see `backend::jail`).
pub fn choose(
    choice: BackendChoice,
    kvm: KvmHost,
    vmm: &Path,
    jail: Option<Arc<Jailer>>,
) -> Result<(Arc<dyn Backend>, String), String> {
    let qemu =
        |accel| -> Arc<dyn Backend> { Arc::new(QemuBackend::with_jail(accel, jail.clone())) };
    let integrated =
        || -> Arc<dyn Backend> { Arc::new(KvmBackend::new(vmm.to_owned(), jail.clone())) };
    match (choice, kvm) {
        (BackendChoice::Kvm, KvmHost::Absent) => Err("backend \"kvm\" needs /dev/kvm, which this host does not have".into()),
        (BackendChoice::Kvm, KvmHost::Pvm) => Err(
            "backend \"kvm\": /dev/kvm is PVM (kvm_pvm), which cannot run stock guest kernels; use \"auto\" or \"qemu\"".into(),
        ),
        (BackendChoice::Kvm | BackendChoice::Auto, KvmHost::Hardware) => Ok((
            integrated(),
            "the integrated VMM: /dev/kvm has hardware virtualization".into(),
        )),
        (BackendChoice::Qemu, KvmHost::Hardware) => Ok((
            qemu(Accel::Kvm),
            "QEMU with KVM, as configured".into(),
        )),
        (BackendChoice::Qemu | BackendChoice::Auto, KvmHost::Pvm) => Ok((
            qemu(Accel::Tcg),
            "QEMU TCG: /dev/kvm is PVM (kvm_pvm), which cannot run stock guest kernels".into(),
        )),
        (BackendChoice::Qemu | BackendChoice::Auto, KvmHost::Absent) => {
            Ok((qemu(Accel::Tcg), "QEMU TCG: there is no usable /dev/kvm".into()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_auto_picks_tcg_on_pvm_and_says_why() {
        let vmm = Path::new("/usr/bin/vmfarm");
        let (backend, why) = choose(BackendChoice::Auto, KvmHost::Pvm, vmm, None).unwrap();
        assert_eq!(backend.name(), "qemu");
        assert!(backend.emulated());
        assert!(why.contains("PVM"), "{why}");
        let (backend, _) = choose(BackendChoice::Auto, KvmHost::Hardware, vmm, None).unwrap();
        assert_eq!(backend.name(), "kvm");
        assert!(!backend.emulated());
        let (backend, _) = choose(BackendChoice::Qemu, KvmHost::Hardware, vmm, None).unwrap();
        assert_eq!((backend.name(), backend.emulated()), ("qemu", false));
        let (backend, why) = choose(BackendChoice::Qemu, KvmHost::Absent, vmm, None).unwrap();
        assert!(backend.emulated() && why.contains("no usable /dev/kvm"));
        let err = choose(BackendChoice::Kvm, KvmHost::Pvm, vmm, None)
            .err()
            .unwrap();
        assert!(err.contains("PVM"), "{err}");
    }
}
