//! A job's guest as the worker's metrics count it: running from its boot until the VMM is
//! dropped (after the job, or after a kept failed guest's time).

use crate::backend::{BackendError, BoxFuture, Console, GuestIo, Vm};
use crate::worker::metrics::Running;
use std::process::ExitStatus;

pub(super) struct CountedVm {
    pub vm: Box<dyn Vm>,
    pub _running: Running,
}

impl Vm for CountedVm {
    fn take_console(&mut self) -> Option<Console> {
        self.vm.take_console()
    }

    fn connect(&mut self) -> BoxFuture<'_, Result<Box<dyn GuestIo>, BackendError>> {
        self.vm.connect()
    }

    fn wait(&mut self) -> BoxFuture<'_, Result<ExitStatus, BackendError>> {
        self.vm.wait()
    }

    fn memory_exhausted(&self) -> Option<String> {
        self.vm.memory_exhausted()
    }

    fn power_off(&mut self) -> BoxFuture<'_, Result<bool, BackendError>> {
        self.vm.power_off()
    }

    fn kill(&mut self) -> BoxFuture<'_, Result<(), BackendError>> {
        self.vm.kill()
    }
}
