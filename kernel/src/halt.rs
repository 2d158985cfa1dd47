//! Ending a run: one place that reports the outcome and stops the machine.

use ipc_schema::halt::HaltStatus;
use ipc_schema::wire::Record;

/// Logs the outcome, sends the halt record, waits for the log to drain and
/// asks the emulator to exit with `status`; on hardware, halts the CPU.
pub fn stop(status: HaltStatus) -> ! {
    if status == HaltStatus::Success {
        defmt::info!(
            "halting: {=str} (status {=u8})",
            status.describe(),
            status.code()
        );
    } else {
        defmt::error!(
            "halting: {=str} (status {=u8})",
            status.describe(),
            status.code()
        );
    }
    crate::log::emit(&Record::Halt {
        status: status.code(),
    });
    crate::log::flush();
    // Safety: the kernel owns the machine and is ending the run.
    unsafe { platform::power::emulator_exit(status.code()) };
    crate::arch::halt_forever()
}
