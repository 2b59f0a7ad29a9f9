//! Legacy port-I/O devices: COM1, the i8042 reset line, the debug-exit port, the
//! boot-timer port, the ACPI (hardware-reduced) sleep and reset registers, and the
//! QEMU test devices kvm-unit-tests uses (fw_cfg, pc-testdev), and the 8259A pair and
//! the CMOS RTC that real-mode code and ACPI S3 need.

pub mod acpi_pm;
pub mod cmos;
pub mod debug;
pub mod i8042;
pub mod i8259;
pub mod qemu_test;
pub mod serial;

pub use acpi_pm::AcpiPmDevice;
pub use debug::{BootTimer, DebugExit};
pub use i8042::I8042;
pub use serial::{IoapicPinTrigger, SerialDevice, SerialOutput};
