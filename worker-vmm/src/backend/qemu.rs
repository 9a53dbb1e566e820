//! The `qemu` backend: qemu-system-x86_64 `-M microvm`, the agent's SSH over a virtio-serial
//! port on a Unix socket, the console on QEMU's stdout, a qcow2 overlay per guest (made as the
//! `kvm` backend makes it, by [`create_overlay`]).

use std::path::Path;
use std::process::Stdio;

use tokio::process::Command;

use super::{
    AgentChannel, Backend, BackendError, BootSpec, BoxFuture, ChannelKind, ProcessVm, RunDir, Vm,
    die_with_parent,
};
use crate::vmm::qcow2::overlay::create_overlay;

const QEMU: &str = "qemu-system-x86_64";

/// How QEMU runs guest code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// Emulation: works everywhere, ~3-5 s to boot a Debian guest.
    Tcg,
    /// The host's /dev/kvm.
    Kvm,
}

#[derive(Debug, Clone)]
pub struct QemuBackend {
    pub accel: Accel,
}

impl QemuBackend {
    pub fn new(accel: Accel) -> Self {
        QemuBackend { accel }
    }

    /// QEMU's arguments for `spec`, booting `overlay` and serving SSH on `socket`.
    pub fn args(&self, spec: &BootSpec, overlay: &Path, socket: &Path) -> Vec<String> {
        let (accel, cpu) = match self.accel {
            Accel::Tcg => ("tcg,thread=multi", "max"),
            Accel::Kvm => ("kvm", "host"),
        };
        let mut args: Vec<String> = vec![
            "-M".into(),
            "microvm,rtc=on".into(),
            "-accel".into(),
            accel.into(),
            "-cpu".into(),
            cpu.into(),
            "-smp".into(),
            spec.vcpus.to_string(),
            "-m".into(),
            format!("{}M", spec.memory_mib),
            "-nodefaults".into(),
            "-no-user-config".into(),
            "-nographic".into(),
            "-no-reboot".into(),
            "-serial".into(),
            "stdio".into(),
            "-kernel".into(),
            spec.kernel.display().to_string(),
            "-append".into(),
            spec.cmdline.clone(),
        ];
        if let Some(initrd) = &spec.initrd {
            args.extend(["-initrd".into(), initrd.display().to_string()]);
        }
        args.extend([
            "-drive".into(),
            format!(
                "id=root,file={},format=qcow2,if=none,discard=unmap",
                overlay.display()
            ),
            "-device".into(),
            "virtio-blk-device,drive=root".into(),
            // microvm has no keyboard controller: without one a `reboot=k` guest (Linux 6.12)
            // never resets, and QEMU (-no-reboot) never exits.
            "-device".into(),
            "i8042".into(),
            "-object".into(),
            "rng-random,id=rng,filename=/dev/urandom".into(),
            "-device".into(),
            "virtio-rng-device,rng=rng".into(),
            "-device".into(),
            "virtio-serial-device".into(),
            "-chardev".into(),
            format!("socket,id=ssh,path={},server=on,wait=off", socket.display()),
            "-device".into(),
            format!("virtserialport,chardev=ssh,name={}", ChannelKind::QEMU_PORT),
        ]);
        args
    }
}

impl Backend for QemuBackend {
    fn name(&self) -> &'static str {
        "qemu"
    }

    fn channel(&self) -> ChannelKind {
        ChannelKind::Vport(ChannelKind::QEMU_PORT.into())
    }

    fn emulated(&self) -> bool {
        self.accel == Accel::Tcg
    }

    fn boot<'a>(&'a self, spec: &'a BootSpec) -> BoxFuture<'a, Result<Box<dyn Vm>, BackendError>> {
        Box::pin(async move {
            std::fs::create_dir_all(&spec.run_dir).map_err(BackendError::RunDir)?;
            let dir = RunDir(spec.run_dir.clone());
            let overlay = dir.0.join("overlay.qcow2");
            let socket = dir.0.join("ssh.sock");
            create_overlay(&spec.base_disk, &overlay).map_err(BackendError::Overlay)?;
            let mut command = Command::new(QEMU);
            command
                .args(self.args(spec, &overlay, &socket))
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .kill_on_drop(true);
            die_with_parent(&mut command);
            let child = command.spawn().map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => BackendError::MissingTool {
                    tool: QEMU,
                    package: "qemu-system-x86",
                },
                _ => BackendError::Spawn(e),
            })?;
            Ok(Box::new(ProcessVm::new(
                child,
                AgentChannel::SerialSocket(socket),
                dir,
            )) as Box<dyn Vm>)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_args_boot_microvm_with_the_contracts_devices() {
        let spec = BootSpec {
            kernel: "/img/kernel".into(),
            initrd: Some("/img/initrd".into()),
            base_disk: "/img/rootfs.qcow2".into(),
            vcpus: 2,
            memory_mib: 1024,
            cmdline: "console=ttyS0".into(),
            run_dir: "/run/g".into(),
        };
        let args = QemuBackend::new(Accel::Tcg).args(
            &spec,
            Path::new("/run/g/o.qcow2"),
            Path::new("/run/g/s"),
        );
        let text = args.join(" ");
        for part in [
            "-M microvm,rtc=on -accel tcg,thread=multi",
            "-smp 2 -m 1024M",
            "-nodefaults -no-user-config -nographic",
            "-kernel /img/kernel -append console=ttyS0 -initrd /img/initrd",
            "file=/run/g/o.qcow2,format=qcow2",
            "virtio-rng-device",
            "-no-reboot",
            "-device i8042",
            "socket,id=ssh,path=/run/g/s,server=on,wait=off",
            "virtserialport,chardev=ssh,name=org.vmfarm.ssh",
        ] {
            assert!(text.contains(part), "{part} missing from {text}");
        }
        assert!(!text.contains("netdev"), "guests have no network");
    }
}
