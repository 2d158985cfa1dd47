//! A virtual CPU: its VMCS, its general registers, entering it and decoding
//! why it came back.
//!
//! The VMCS is set up once ([`Vcpu::new`]) for a guest started the way a
//! multiboot loader starts one: 32-bit protected mode, paging off, flat
//! segments, EAX = 0x2BADB002, EBX = the information block. Unrestricted
//! guest lets it run without paging; EPT translates its physical addresses.
//! CR0.NE and CR4.VMXE, which VMX operation requires, are owned by the host
//! (guest/host masks) and read as the guest last wrote them.

use crate::vmx::{self, VmxError, run, vmread, vmwrite, vmwrite_unchecked};
use ipc_schema::guest_state;
use ipc_schema::syscall::regs;
use ipc_schema::vmexit::{AccessBits, Exit, ExitKind, GuestRegs, Inject, Response};
use platform::multiboot::{BOOT_MAGIC, INFO_GPA};
use platform::vmx::fields::*;
use platform::vmx::{VmxCaps, entry, exit, pin, proc1, proc2};

/// What a vCPU is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, defmt::Format)]
pub enum VcpuState {
    Runnable,
    /// Waiting for an event (HLT).
    Blocked,
    Stopped,
}

/// The controls every Parallax vCPU runs with.
const PIN: u32 = pin::EXTERNAL_INTERRUPT_EXITING | pin::NMI_EXITING;
/// RDPMC, MONITOR and MWAIT exit (the vmm answers them: host performance
/// counters are not the guest's, and MWAIT would sleep the host's CPU).
/// CR8 is virtualized by the TPR shadow (a guest's MOV to CR8 writes its
/// virtual-APIC page, never the host's local APIC), or exits on a CPU
/// without one ([`Vcpu::new`]).
const PROC1: u32 = proc1::HLT_EXITING
    | UNCONDITIONAL_IO_EXITING
    | proc1::USE_MSR_BITMAPS
    | proc1::SECONDARY_CONTROLS
    | proc1::RDPMC_EXITING
    | proc1::MONITOR_EXITING
    | proc1::MWAIT_EXITING;
const PROC2: u32 = proc2::ENABLE_EPT | proc2::ENABLE_VPID | proc2::UNRESTRICTED_GUEST;
const EXIT: u32 = exit::HOST_ADDRESS_SPACE_SIZE
    | exit::ACK_INTERRUPT_ON_EXIT
    | exit::SAVE_IA32_PAT
    | exit::LOAD_IA32_PAT
    | exit::SAVE_IA32_EFER
    | exit::LOAD_IA32_EFER;
const ENTRY: u32 = entry::LOAD_IA32_PAT | entry::LOAD_IA32_EFER;
const UNCONDITIONAL_IO_EXITING: u32 = 1 << 24;

/// The registers VCPU_REGS reads and writes as they are in a VMCS field,
/// by index.
const FIELDS: [(usize, u32); 13] = [
    (regs::RSP, GUEST_RSP),
    (regs::RIP, GUEST_RIP),
    (regs::RFLAGS, GUEST_RFLAGS),
    (regs::CR3, GUEST_CR3),
    (regs::EFER, GUEST_IA32_EFER),
    (regs::CS_BASE, GUEST_CS_BASE),
    (regs::DS_BASE, GUEST_DS_BASE),
    (regs::ES_BASE, GUEST_ES_BASE),
    (regs::FS_BASE, GUEST_FS_BASE),
    (regs::GS_BASE, GUEST_GS_BASE),
    (regs::SS_BASE, GUEST_SS_BASE),
    (regs::GDTR_BASE, GUEST_GDTR_BASE),
    (regs::IDTR_BASE, GUEST_IDTR_BASE),
];

/// The VMCS fields a fork copies from its parent's vCPU: the whole guest
/// state and the event it is about to be given.
const FORK_FIELDS: [u32; 57] = [
    GUEST_ES_SELECTOR,
    GUEST_CS_SELECTOR,
    GUEST_SS_SELECTOR,
    GUEST_DS_SELECTOR,
    GUEST_FS_SELECTOR,
    GUEST_GS_SELECTOR,
    GUEST_LDTR_SELECTOR,
    GUEST_TR_SELECTOR,
    GUEST_ES_LIMIT,
    GUEST_CS_LIMIT,
    GUEST_SS_LIMIT,
    GUEST_DS_LIMIT,
    GUEST_FS_LIMIT,
    GUEST_GS_LIMIT,
    GUEST_LDTR_LIMIT,
    GUEST_TR_LIMIT,
    GUEST_GDTR_LIMIT,
    GUEST_IDTR_LIMIT,
    GUEST_ES_ACCESS,
    GUEST_CS_ACCESS,
    GUEST_SS_ACCESS,
    GUEST_DS_ACCESS,
    GUEST_FS_ACCESS,
    GUEST_GS_ACCESS,
    GUEST_LDTR_ACCESS,
    GUEST_TR_ACCESS,
    GUEST_ES_BASE,
    GUEST_CS_BASE,
    GUEST_SS_BASE,
    GUEST_DS_BASE,
    GUEST_FS_BASE,
    GUEST_GS_BASE,
    GUEST_LDTR_BASE,
    GUEST_TR_BASE,
    GUEST_GDTR_BASE,
    GUEST_IDTR_BASE,
    GUEST_CR0,
    GUEST_CR3,
    GUEST_CR4,
    CR0_READ_SHADOW,
    CR4_READ_SHADOW,
    GUEST_DR7,
    GUEST_RSP,
    GUEST_RIP,
    GUEST_RFLAGS,
    GUEST_IA32_EFER,
    GUEST_IA32_PAT,
    GUEST_INTERRUPTIBILITY,
    GUEST_ACTIVITY_STATE,
    GUEST_IA32_DEBUGCTL,
    GUEST_PENDING_DEBUG,
    GUEST_SYSENTER_CS,
    GUEST_SYSENTER_ESP,
    GUEST_SYSENTER_EIP,
    ENTRY_INTERRUPTION_INFO,
    ENTRY_EXCEPTION_ERROR_CODE,
    ENTRY_INSTRUCTION_LENGTH,
];

/// CR0 and CR4 by index: (the real field, its read shadow, the bits the
/// host keeps set). The guest reads the shadow's value of those bits.
const SHADOWED: [(usize, u32, u32, u64); 2] = [
    (regs::CR0, GUEST_CR0, CR0_READ_SHADOW, CR0_HOST_OWNED),
    (regs::CR4, GUEST_CR4, CR4_READ_SHADOW, CR4_HOST_OWNED),
];

/// The general registers the kernel saves (all but RSP), with their
/// VCPU_REGS index.
fn gprs(r: &mut GuestRegs) -> [(usize, &mut u64); 15] {
    [
        (regs::RAX, &mut r.rax),
        (regs::RBX, &mut r.rbx),
        (regs::RCX, &mut r.rcx),
        (regs::RDX, &mut r.rdx),
        (regs::RSI, &mut r.rsi),
        (regs::RDI, &mut r.rdi),
        (regs::RBP, &mut r.rbp),
        (regs::R8, &mut r.r8),
        (regs::R8 + 1, &mut r.r9),
        (regs::R8 + 2, &mut r.r10),
        (regs::R8 + 3, &mut r.r11),
        (regs::R8 + 4, &mut r.r12),
        (regs::R8 + 5, &mut r.r13),
        (regs::R8 + 6, &mut r.r14),
        (regs::R8 + 7, &mut r.r15),
    ]
}

/// CR0.NE and CR4.VMXE stay set under the guest's feet.
const CR0_HOST_OWNED: u64 = 1 << 5;
const CR4_HOST_OWNED: u64 = 1 << 13;

/// How a vCPU is set up.
pub struct VcpuSetup {
    pub id: u16,
    /// VPID, nonzero.
    pub vpid: u16,
    pub entry: u32,
    pub eptp: u64,
    /// Physical address of the domain's EPTP list (for VMFUNC), if used.
    pub eptp_list: Option<u64>,
    pub msr_bitmap: u64,
    /// TSC ticks per preemption-timer slice, if the timer is used.
    pub slice: Option<u32>,
    /// The APIC-access frame, where the CPU virtualizes the xAPIC page.
    pub apic_access: Option<u64>,
}

/// Why a vCPU could not be set up or entered.
#[derive(Clone, Copy, Debug, defmt::Format)]
pub enum VcpuError {
    OutOfMemory,
    Vmx(VmxError),
    /// The CPU cannot set a control Parallax needs (the bits).
    Control {
        field: &'static str,
        bits: u32,
    },
}

impl From<VmxError> for VcpuError {
    fn from(e: VmxError) -> Self {
        VcpuError::Vmx(e)
    }
}

/// One virtual CPU.
pub struct Vcpu {
    pub id: u16,
    vmcs: u64,
    pub regs: GuestRegs,
    launched: bool,
    /// VM exits the guest caused (instructions, faults); exits for the
    /// hypervisor's own reasons (preemption timer, host interrupts) are not
    /// counted.
    pub exits: u64,
    pub state: VcpuState,
    proc2: u32,
    /// The primary controls in force (the monitor trap flag comes and goes).
    proc1: u32,
    /// A single step by the trap flag (on a CPU without the monitor trap
    /// flag) is under way: the guest's own TF, to put back.
    tf_step: Option<bool>,
    /// The view last set by the kernel (VMFUNC may have changed it since:
    /// [`Vcpu::active_view`] asks the VMCS).
    view: u16,
    vmfunc: bool,
    /// The two PML buffers, while logging (frames of a service's).
    pub pml: Option<PmlBuffers>,
    /// Why the last VMLAUNCH/VMRESUME failed.
    pub vmx_error: Option<VmxError>,
    /// The frame holding the state VMX does not switch ([`super::cpustate`]).
    save_area: u64,
    /// The virtual-APIC page (its TPR is the guest's CR8), where the CPU
    /// has the TPR shadow.
    virtual_apic: Option<u64>,
    /// The TSC value at which its handler wants an [`ExitKind::Deadline`]
    /// (`u64::MAX`: none): set by `Then::ResumeUntil` and
    /// `Then::BlockUntil`, cleared when the exit is sent.
    pub deadline: u64,
}

/// The reason [`RawExit::START`] carries (basic exit reasons end below 80).
const START_REASON: u16 = 0xfffe;
/// The reason [`RawExit::DEADLINE`] carries.
const DEADLINE_REASON: u16 = 0xfffd;

/// How one entry ended: the VMCS exit-reason field (basic reason in bits
/// 15:0, VM-entry failure in bit 31), or [`RawExit::VMX_FAILED`] when the
/// VMLAUNCH/VMRESUME instruction itself failed (the error is in
/// [`Vcpu::vmx_error`]). One `u32`, so that the exit fast path stays a few
/// instructions; the rest is read from the VMCS on demand.
#[derive(Clone, Copy, Debug)]
pub struct RawExit(u32);

impl RawExit {
    pub const VMX_FAILED: RawExit = RawExit(u32::MAX);
    /// Not an exit of the CPU's: the vCPU is about to run for the first
    /// time ([`ExitKind::Start`]); its "reason" is none the CPU reports.
    pub const START: RawExit = RawExit(START_REASON as u32);
    /// Not an exit of the CPU's: the TSC reached the deadline its handler
    /// set ([`ExitKind::Deadline`]).
    pub const DEADLINE: RawExit = RawExit(DEADLINE_REASON as u32);

    #[inline(always)]
    pub fn reason(self) -> u16 {
        self.0 as u16
    }

    /// An exit of basic reason `reason` that is no entry failure (the
    /// other flags, bits 16 to 30, are reserved or SMM's and SGX's, as
    /// `reason` and `entry_failure` ignore them): one mask and comparison
    /// for the fast paths.
    #[inline(always)]
    pub fn is(self, reason: u16) -> bool {
        self.0 & 0x8000_ffff == u32::from(reason)
    }

    /// The entry itself failed on guest state checks (reason 33, 34, 41).
    #[inline(always)]
    pub fn entry_failure(self) -> bool {
        self.0 & (1 << 31) != 0 && self.0 != u32::MAX
    }

    #[inline(always)]
    pub fn vmx_failed(self) -> bool {
        self.0 == u32::MAX
    }
}

impl Vcpu {
    /// Creates the vCPU and its VMCS (left current on this CPU).
    pub fn new(setup: &VcpuSetup, caps: &VmxCaps) -> Result<Self, VcpuError> {
        let vmcs = super::memory::alloc_zeroed_frame().ok_or(VcpuError::OutOfMemory)?;
        // Safety: the frame is ours and zeroed; the revision is the CPU's.
        unsafe {
            crate::mem::phys_to_virt(vmcs)
                .cast::<u32>()
                .write_volatile(caps.revision)
        };
        let mut proc2 = PROC2;
        if setup.eptp_list.is_some() {
            proc2 |= proc2::ENABLE_VM_FUNCTIONS;
        }
        let save_area = super::memory::alloc_zeroed_frame().ok_or(VcpuError::OutOfMemory)?;
        super::cpustate::reset(crate::mem::phys_to_virt(save_area));
        let (proc1, virtual_apic) = if caps.proc1.allows(proc1::USE_TPR_SHADOW) {
            let page = super::memory::alloc_zeroed_frame().ok_or(VcpuError::OutOfMemory)?;
            // The xAPIC page: reads from the virtual-APIC page, writes
            // exit to the handler after they are done (APIC write).
            if setup.apic_access.is_some() {
                proc2 |= proc2::VIRTUALIZE_APIC_ACCESSES | proc2::APIC_REGISTER_VIRTUALIZATION;
            }
            (PROC1 | proc1::USE_TPR_SHADOW, Some(page))
        } else {
            (
                PROC1 | proc1::CR8_LOAD_EXITING | proc1::CR8_STORE_EXITING,
                None,
            )
        };
        let v = Vcpu {
            id: setup.id,
            vmcs,
            regs: GuestRegs {
                rax: u64::from(BOOT_MAGIC),
                rbx: INFO_GPA,
                ..GuestRegs::default()
            },
            launched: false,
            exits: 0,
            state: VcpuState::Runnable,
            proc2,
            proc1,
            tf_step: None,
            deadline: u64::MAX,
            view: 0,
            vmfunc: setup.eptp_list.is_some(),
            pml: None,
            vmx_error: None,
            save_area,
            virtual_apic,
        };
        // Safety: VMX operation is on (vm::init); the VMCS is this frame.
        unsafe {
            vmx::vmclear(vmcs)?;
            vmx::vmptrld(vmcs)?;
            v.write_controls(setup, caps)?;
            write_host_state()?;
            write_guest_state(setup)?;
        }
        Ok(v)
    }

    /// # Safety
    /// This vCPU's VMCS is current.
    unsafe fn write_controls(&self, setup: &VcpuSetup, caps: &VmxCaps) -> Result<(), VcpuError> {
        let control = |field: &'static str, c: &platform::vmx::Controls, want: u32| {
            c.value_for(want)
                .map(u64::from)
                .map_err(|bits| VcpuError::Control { field, bits })
        };
        let mut pin_bits = PIN;
        let mut exit_bits = EXIT;
        if setup.slice.is_some() {
            pin_bits |= pin::PREEMPTION_TIMER;
            // The timer keeps counting down across exits the kernel answers
            // itself: a slice is guest time, whatever the guest does.
            exit_bits |= exit::SAVE_PREEMPTION_TIMER;
        }
        // Safety: the caller's contract; every value comes from the CPU's
        // capability MSRs or from frames this vCPU owns.
        unsafe {
            vmwrite(
                PIN_BASED_CONTROLS,
                control("pin-based", &caps.pin, pin_bits)?,
            )?;
            vmwrite(
                PRIMARY_CONTROLS,
                control("primary", &caps.proc1, self.proc1)?,
            )?;
            vmwrite(
                SECONDARY_CONTROLS,
                control("secondary", &caps.proc2, self.proc2)?,
            )?;
            vmwrite(EXIT_CONTROLS, control("exit", &caps.exit, exit_bits)?)?;
            if let Some(page) = self.virtual_apic {
                vmwrite(VIRTUAL_APIC_PAGE_ADDR, page)?;
                vmwrite(TPR_THRESHOLD, 0)?;
                if let Some(frame) = setup.apic_access {
                    vmwrite(APIC_ACCESS_ADDR, frame)?;
                }
            }
            vmwrite(ENTRY_CONTROLS, control("entry", &caps.entry, ENTRY)?)?;
            vmwrite(EXCEPTION_BITMAP, 0)?;
            vmwrite(CR3_TARGET_COUNT, 0)?;
            vmwrite(EXIT_MSR_STORE_COUNT, 0)?;
            vmwrite(EXIT_MSR_LOAD_COUNT, 0)?;
            vmwrite(ENTRY_MSR_LOAD_COUNT, 0)?;
            vmwrite(ENTRY_INTERRUPTION_INFO, 0)?;
            vmwrite(MSR_BITMAP, setup.msr_bitmap)?;
            vmwrite(VPID, u64::from(setup.vpid))?;
            vmwrite(EPT_POINTER, setup.eptp)?;
            if let Some(list) = setup.eptp_list {
                vmwrite(VM_FUNCTION_CONTROLS, 1)?; // leaf 0: EPTP switching
                vmwrite(EPTP_LIST_ADDRESS, list)?;
                vmwrite(EPTP_INDEX, 0)?;
            }
            vmwrite(CR0_GUEST_HOST_MASK, CR0_HOST_OWNED)?;
            vmwrite(CR4_GUEST_HOST_MASK, CR4_HOST_OWNED)?;
            vmwrite(CR0_READ_SHADOW, 0x11)?;
            vmwrite(CR4_READ_SHADOW, 0)?;
            vmwrite(VMCS_LINK_POINTER, u64::MAX)?;
            if let Some(ticks) = setup.slice {
                vmwrite(PREEMPTION_TIMER_VALUE, u64::from(ticks))?;
            }
        }
        Ok(())
    }

    /// Makes this vCPU's VMCS current on this CPU.
    pub fn load(&self) -> Result<(), VmxError> {
        // Safety: VMX operation is on; the VMCS belongs to this vCPU and is
        // only ever current on this CPU.
        unsafe { vmx::vmptrld(self.vmcs) }
    }

    /// Runs the guest until its next exit.
    #[inline(always)]
    pub fn enter(&mut self) -> RawExit {
        super::cpustate::switch_to(self.save_area);
        // Safety: `load` made the VMCS current; `new` initialised it with
        // this CPU's host state and the exit landing.
        if let Err(e) = unsafe { run::enter(&mut self.regs, self.launched) } {
            self.vmx_error = Some(e);
            return RawExit::VMX_FAILED;
        }
        self.launched = true;
        // (Wrapping: 2^64 exits do not happen, and the exit path has no
        // overflow check to pay.)
        self.exits = self.exits.wrapping_add(1);
        // Safety: the VMCS is current.
        RawExit(unsafe { vmread(EXIT_REASON) } as u32)
    }

    /// The exit qualification of the last exit.
    pub fn qualification(&self) -> u64 {
        self.read(EXIT_QUALIFICATION)
    }

    /// Moves RIP past the instruction that exited.
    #[inline]
    pub fn skip_instruction(&mut self) {
        // Safety: the VMCS is current; RIP plus the exit instruction length
        // is where the guest's next instruction starts.
        unsafe {
            // The guest chose RIP: it wraps as the CPU's own would, never
            // overflowing in the kernel.
            let rip = vmread(GUEST_RIP).wrapping_add(vmread(EXIT_INSTRUCTION_LENGTH));
            vmwrite_unchecked(GUEST_RIP, rip);
            // Stepping over an instruction ends STI/MOV-SS blocking.
            let intr = vmread(GUEST_INTERRUPTIBILITY);
            if intr & 3 != 0 {
                vmwrite_unchecked(GUEST_INTERRUPTIBILITY, intr & !3);
            }
        }
    }

    /// A MOV to CR0 or CR4 that touched a host-owned bit (CR0.NE, CR4.VMXE):
    /// the guest's value becomes what it reads back, the real register keeps
    /// the bit VMX needs. Setting CR4.VMXE (nested VMX) gets #GP. Returns
    /// false for anything else (handed to the exit handler).
    pub fn control_register_write(&mut self, q: u64) -> bool {
        let (cr, kind, reg) = (q & 0xf, (q >> 4) & 3, (q >> 8) & 0xf);
        if kind != 0 {
            return false;
        }
        let r = &self.regs;
        let value = match reg {
            0 => r.rax,
            1 => r.rcx,
            2 => r.rdx,
            3 => r.rbx,
            4 => self.read(GUEST_RSP),
            5 => r.rbp,
            6 => r.rsi,
            7 => r.rdi,
            8 => r.r8,
            9 => r.r9,
            10 => r.r10,
            11 => r.r11,
            12 => r.r12,
            13 => r.r13,
            14 => r.r14,
            _ => r.r15,
        };
        match cr {
            // Safety: the VMCS is current; the values keep the bits VMX
            // requires and are otherwise the guest's own.
            0 => unsafe {
                let old = self.read(GUEST_CR0);
                let _ = vmwrite(CR0_READ_SHADOW, value);
                let _ = vmwrite(GUEST_CR0, value | CR0_HOST_OWNED);
                // Paging turned on or off by this (emulated) write: long mode
                // follows EFER.LME, as the CPU would do it.
                let paging = value & (1 << 31) != 0;
                if paging != (old & (1 << 31) != 0) {
                    let efer = self.read(GUEST_IA32_EFER);
                    if efer & (1 << 8) != 0 {
                        let lma = if paging {
                            efer | (1 << 10)
                        } else {
                            efer & !(1 << 10)
                        };
                        let _ = vmwrite(GUEST_IA32_EFER, lma);
                        let entry = self.read(ENTRY_CONTROLS);
                        let ia32e = u64::from(entry::IA32E_MODE_GUEST);
                        let _ = vmwrite(
                            ENTRY_CONTROLS,
                            if paging {
                                entry | ia32e
                            } else {
                                entry & !ia32e
                            },
                        );
                    }
                }
                self.skip_instruction();
                true
            },
            4 if value & CR4_HOST_OWNED != 0 => {
                self.inject_exception(13, Some(0));
                true
            }
            // Safety: as for CR0.
            4 => unsafe {
                let _ = vmwrite(CR4_READ_SHADOW, value);
                let _ = vmwrite(GUEST_CR4, value | CR4_HOST_OWNED);
                self.skip_instruction();
                true
            },
            _ => false,
        }
    }

    /// The single step of a CPU without the monitor trap flag: the guest's
    /// RFLAGS.TF set for one instruction, its #DB trapped (exception bitmap
    /// bit 1) and reported as a monitor-trap exit. The guest's own TF is put
    /// back after. (An instruction that reads RFLAGS during the step, such
    /// as PUSHF, sees TF set.)
    fn set_trap_flag_step(&mut self, on: bool) -> bool {
        const TF: u64 = 1 << 8;
        let rflags = self.read(GUEST_RFLAGS);
        let bitmap = self.read(EXCEPTION_BITMAP);
        if on {
            if self.tf_step.is_none() {
                self.tf_step = Some(rflags & TF != 0);
            }
            // Safety: the VMCS is current; TF and the #DB bit are the
            // guest's flag and an exit control, both free to set.
            unsafe {
                let _ = vmwrite(GUEST_RFLAGS, rflags | TF);
                let _ = vmwrite(EXCEPTION_BITMAP, bitmap | 1 << 1);
            }
        } else if let Some(had_tf) = self.tf_step.take() {
            let flags = if had_tf { rflags | TF } else { rflags & !TF };
            // Safety: as above, putting back what the guest had.
            unsafe {
                let _ = vmwrite(GUEST_RFLAGS, flags);
                let _ = vmwrite(EXCEPTION_BITMAP, bitmap & !(1 << 1));
            }
        }
        true
    }

    /// Decodes an exit into the message an exit handler receives.
    pub fn decode(&self, domain: u16, raw: &RawExit) -> Exit {
        let mut e = Exit {
            domain,
            vcpu: self.id,
            view: 0,
            instruction_len: 0,
            rip: 0,
            kind: ExitKind::Hlt,
        };
        self.decode_into(domain, raw, &mut e);
        e
    }

    /// [`Vcpu::decode`] into `out`, field by field (the exit path keeps the
    /// pending exit in its domain and decodes each exit there).
    #[inline]
    pub fn decode_into(&self, domain: u16, raw: &RawExit, out: &mut Exit) {
        out.domain = domain;
        out.vcpu = self.id;
        self.decode_kind_into(raw, &mut out.kind);
        out.rip = self.read(GUEST_RIP);
        out.instruction_len = self.read(EXIT_INSTRUCTION_LENGTH) as u8;
        out.view = self.active_view();
    }

    /// The kind of an exit, written into `out` variant by variant (no value
    /// of the whole enum assembled and copied).
    #[inline(always)]
    fn decode_kind_into(&self, raw: &RawExit, out: &mut ExitKind) {
        use platform::vmx::fields::reason as r;
        let read = |f| self.read(f);
        // Read only for the exits that report one.
        let q = || self.qualification();
        if raw.entry_failure() {
            *out = ExitKind::Other {
                reason: raw.reason(),
                qualification: q(),
            }
        } else {
            match raw.reason() {
                r::CPUID => {
                    *out = ExitKind::Cpuid {
                        leaf: self.regs.rax as u32,
                        subleaf: self.regs.rcx as u32,
                    }
                }
                r::VMCALL => *out = ExitKind::Hypercall,
                r::IO_INSTRUCTION => {
                    let io = platform::vmx::fields::IoQualification::decode(q());
                    if io.string || io.rep {
                        *out = ExitKind::Other {
                            reason: raw.reason(),
                            qualification: q(),
                        }
                    } else {
                        let mask = if io.size == 4 {
                            u32::MAX
                        } else {
                            (1u32 << (8 * io.size)) - 1
                        };
                        *out = ExitKind::Io {
                            port: io.port,
                            size: io.size,
                            write: io.write,
                            value: self.regs.rax as u32 & mask,
                        }
                    }
                }
                r::HLT => *out = ExitKind::Hlt,
                START_REASON => *out = ExitKind::Start,
                DEADLINE_REASON => *out = ExitKind::Deadline,
                r::INTERRUPT_WINDOW => *out = ExitKind::InterruptWindow,
                r::MONITOR_TRAP_FLAG => *out = ExitKind::MonitorTrap,
                // The #DB of a trap-flag step (exception bitmap bit 1 is set
                // only for one).
                r::EXCEPTION_OR_NMI
                    if self.tf_step.is_some() && read(EXIT_INTERRUPTION_INFO) & 0x7ff == 0x301 =>
                {
                    *out = ExitKind::MonitorTrap
                }
                r::RDMSR => {
                    *out = ExitKind::Rdmsr {
                        msr: self.regs.rcx as u32,
                    }
                }
                r::WRMSR => {
                    *out = ExitKind::Wrmsr {
                        msr: self.regs.rcx as u32,
                        value: (self.regs.rdx << 32) | (self.regs.rax & 0xffff_ffff),
                    }
                }
                r::EPT_VIOLATION => {
                    let qualification = q();
                    let v = platform::vmx::fields::EptViolation::decode(qualification);
                    *out = ExitKind::EptViolation {
                        gpa: read(GUEST_PHYSICAL_ADDRESS),
                        gla: v.linear_valid.then(|| read(GUEST_LINEAR_ADDRESS)),
                        access: AccessBits {
                            read: v.read,
                            write: v.write,
                            execute: v.fetch,
                        },
                        allowed: AccessBits {
                            read: v.allowed_read,
                            write: v.allowed_write,
                            execute: v.allowed_execute,
                        },
                        qualification,
                    }
                }
                r::EPT_MISCONFIG => {
                    *out = ExitKind::EptMisconfig {
                        gpa: read(GUEST_PHYSICAL_ADDRESS),
                    }
                }
                r::TRIPLE_FAULT => *out = ExitKind::TripleFault,
                r::VMFUNC => {
                    *out = ExitKind::Vmfunc {
                        leaf: self.regs.rax as u32,
                        index: self.regs.rcx as u32,
                    }
                }
                // Trap-like: done, RIP past it; the value is in the page.
                r::APIC_WRITE => {
                    let offset = (q() & 0xff0) as u16;
                    let reg = |at: u16| u64::from(self.apic_register(at).unwrap_or(0));
                    let high = if offset == 0x300 { reg(0x310) << 32 } else { 0 };
                    *out = ExitKind::ApicWrite {
                        offset,
                        value: reg(offset) | high,
                    }
                }
                r::XSETBV => {
                    *out = ExitKind::Xsetbv {
                        index: self.regs.rcx as u32,
                        value: (self.regs.rdx << 32) | (self.regs.rax & 0xffff_ffff),
                    }
                }
                other => {
                    *out = ExitKind::Other {
                        reason: other,
                        qualification: q(),
                    }
                }
            }
        }
    }

    /// Carries out a handler's response (RIP, injection). The caller acts on
    /// `response.then`.
    #[inline]
    pub fn apply(&mut self, response: &Response) {
        let Some(inject) = response.inject else {
            return self.resume_plain(response.advance);
        };
        // Before the first entry (the `Start` exit) there is no instruction
        // to skip.
        if response.advance && self.launched {
            self.skip_instruction();
        }
        match inject {
            Inject::Exception { vector, error_code } => self.inject_exception(vector, error_code),
            Inject::Interrupt { vector } => {
                let info = platform::vmx::fields::inject::interrupt(vector);
                // Safety: the VMCS is current; the caller checked that the
                // guest can take an external interrupt (`can_take_interrupt`).
                unsafe {
                    let _ = vmwrite(ENTRY_INTERRUPTION_INFO, u64::from(info));
                }
            }
        }
    }

    /// A response without an injection carried out: the instruction
    /// skipped with `advance`, and an event the exit interrupted delivered
    /// again (before the first entry, neither is there).
    #[inline(always)]
    pub fn resume_plain(&mut self, advance: bool) {
        if self.launched {
            if advance {
                self.skip_instruction();
            }
            self.reinject_interrupted_event();
        }
    }

    /// Whether the guest can take an external interrupt on the next entry
    /// (VM entry's checks for injecting one): RFLAGS.IF set, no blocking by
    /// STI or MOV SS, and no event of its own being delivered again.
    pub fn can_take_interrupt(&self) -> bool {
        self.read(GUEST_RFLAGS) & (1 << 9) != 0
            && self.read(platform::vmx::fields::GUEST_INTERRUPTIBILITY) & 3 == 0
            && self.read(IDT_VECTORING_INFO) & (1 << 31) == 0
    }

    /// Turns interrupt-window exiting on or off: with it, the vCPU exits
    /// (reason 7) as soon as the guest can take an external interrupt.
    pub fn set_window(&mut self, caps: &VmxCaps, on: bool) -> bool {
        let want = toggled(self.proc1, proc1::INTERRUPT_WINDOW_EXITING, on);
        want == self.proc1 || set_control(&caps.proc1, PRIMARY_CONTROLS, want, &mut self.proc1)
    }

    /// Queues a hardware exception for the next entry.
    pub fn inject_exception(&mut self, vector: u8, error_code: Option<u32>) {
        let info = platform::vmx::fields::inject::exception(vector, error_code.is_some());
        // Safety: the VMCS is current; the event is a valid exception.
        unsafe {
            let _ = vmwrite(ENTRY_INTERRUPTION_INFO, u64::from(info));
            if let Some(code) = error_code {
                let _ = vmwrite(ENTRY_EXCEPTION_ERROR_CODE, u64::from(code));
            }
        }
    }

    /// An exit that interrupted the delivery of an event (an EPT violation
    /// on the guest's IDT or stack, say) must not lose the event: it is
    /// delivered again on the next entry.
    pub fn reinject_interrupted_event(&mut self) {
        // Safety: the VMCS is current; the IDT-vectoring fields describe the
        // event the CPU was delivering, which is valid to deliver again.
        unsafe {
            let info = vmread(IDT_VECTORING_INFO);
            if info & (1 << 31) != 0 {
                let _ = vmwrite(ENTRY_INTERRUPTION_INFO, info & !(1 << 12));
                if info & (1 << 11) != 0 {
                    let _ = vmwrite(ENTRY_EXCEPTION_ERROR_CODE, vmread(IDT_VECTORING_ERROR_CODE));
                }
                let _ = vmwrite(ENTRY_INSTRUCTION_LENGTH, vmread(EXIT_INSTRUCTION_LENGTH));
            }
        }
    }

    /// Every register VCPU_REGS reads, in `ipc_schema::syscall::regs`
    /// order (the VMCS must be current). CR0 and CR4 as the guest reads
    /// them.
    pub fn registers(&self) -> [u64; regs::COUNT] {
        let mut v = [0; regs::COUNT];
        let mut r = self.regs;
        for (i, x) in gprs(&mut r) {
            v[i] = *x;
        }
        for (i, f) in FIELDS {
            v[i] = self.read(f);
        }
        for (i, real, shadow, host) in SHADOWED {
            v[i] = self.read(real) & !host | self.read(shadow) & host;
        }
        v[regs::CS] = self.read(GUEST_CS_SELECTOR) | self.read(GUEST_CS_ACCESS) << 16;
        v[regs::INFO] = u64::from(self.active_view()) | self.exits << 16;
        v
    }

    /// Sets the registers of `mask` to `values` (the VMCS current), after
    /// VM entry's checks on the whole resulting state: the first register
    /// that fails them, and why, and nothing written.
    pub fn set_registers(
        &mut self,
        values: &[u64; regs::COUNT],
        mask: u64,
    ) -> Result<(), (usize, &'static str)> {
        let mut all = self.registers();
        for i in (0..regs::COUNT).filter(|&i| mask & 1 << i != 0) {
            all[i] = values[i];
        }
        // Safety: reading the VMX fixed-bit MSRs has no side effect; VMX
        // operation is on.
        let fixed = |lo, hi| unsafe { (platform::cpu::rdmsr(lo), platform::cpu::rdmsr(hi)) };
        let cx = guest_state::Context {
            lma: self.read(ENTRY_CONTROLS) & u64::from(entry::IA32E_MODE_GUEST) != 0,
            cs_long: self.read(GUEST_CS_ACCESS) & 1 << 13 != 0,
            cr0_fixed: fixed(
                platform::vmx::IA32_VMX_CR0_FIXED0,
                platform::vmx::IA32_VMX_CR0_FIXED1,
            ),
            cr4_fixed: fixed(
                platform::vmx::IA32_VMX_CR4_FIXED0,
                platform::vmx::IA32_VMX_CR4_FIXED1,
            ),
            cr0_host: CR0_HOST_OWNED,
            cr4_host: CR4_HOST_OWNED,
            phys_bits: (platform::cpu::cpuid(0x8000_0008, 0).eax & 0xff) as u8,
        };
        guest_state::check(&all, mask, &cx)?;
        let set = |i: usize| mask & 1 << i != 0;
        for (i, x) in gprs(&mut self.regs) {
            if set(i) {
                *x = all[i];
            }
        }
        for (i, f) in FIELDS.into_iter().filter(|&(i, _)| set(i)) {
            // Safety: the VMCS is current; the state passed VM entry's
            // checks above.
            unsafe { self.write(f, all[i]) };
        }
        for (i, real, shadow, host) in SHADOWED.into_iter().filter(|&(i, ..)| set(i)) {
            // Safety: as above; the host-owned bits stay set.
            unsafe {
                self.write(shadow, all[i]);
                self.write(real, all[i] | host);
            }
        }
        Ok(())
    }

    /// The view the vCPU runs on now (VMFUNC may have switched it).
    pub fn active_view(&self) -> u16 {
        if self.vmfunc {
            // Safety: the VMCS is current.
            unsafe { vmread(EPTP_INDEX) as u16 }
        } else {
            self.view
        }
    }

    /// Points the vCPU at another view.
    pub fn set_view(&mut self, view: u16, eptp: u64) {
        // Safety: the VMCS is current; `eptp` is the EPT pointer of a live
        // view of this vCPU's domain.
        unsafe {
            let _ = vmwrite(EPT_POINTER, eptp);
            if self.vmfunc {
                let _ = vmwrite(EPTP_INDEX, u64::from(view));
            }
        }
        self.view = view;
    }

    /// The 32-bit register at `offset` (16-byte aligned, below 0x400) of
    /// the virtual-APIC page; `None` without one.
    pub fn apic_register(&self, offset: u16) -> Option<u32> {
        let page = self.virtual_apic?;
        let at = u64::from(offset & 0x3f0);
        // Safety: the vCPU's own frame, in the direct map; an aligned u32
        // inside it. The CPU writes it only while this vCPU runs.
        Some(unsafe {
            crate::mem::phys_to_virt(page + at)
                .cast::<u32>()
                .read_volatile()
        })
    }

    /// Writes the register at `offset` of the virtual-APIC page (what the
    /// guest reads at its xAPIC page); false where there is none, or for
    /// the task priority (the guest's own, its CR8) or an offset that is
    /// not a register's.
    pub fn set_apic_register(&mut self, offset: u64, value: u32) -> bool {
        let Some(page) = self.virtual_apic else {
            return false;
        };
        if offset >= 0x400 || !offset.is_multiple_of(16) || offset == 0x80 {
            return false;
        }
        // Safety: as in `apic_register`; the vCPU is not running (its
        // handler or a service calls while it waits or is paused).
        unsafe {
            crate::mem::phys_to_virt(page + offset)
                .cast::<u32>()
                .write_volatile(value)
        };
        true
    }

    /// Whether secondary control `bits` are on.
    pub fn secondary(&self, bits: u32) -> bool {
        self.proc2 & bits == bits
    }

    /// Turns a secondary control on or off (#VE, PML), returning whether the
    /// CPU allows it.
    pub fn set_secondary(&mut self, caps: &VmxCaps, bits: u32, on: bool) -> bool {
        let want = toggled(self.proc2, bits, on);
        set_control(&caps.proc2, SECONDARY_CONTROLS, want, &mut self.proc2)
    }

    /// Sets or clears the monitor trap flag: with it, the vCPU exits after
    /// one instruction (one guest step for a handler that asked for it).
    /// False if the CPU cannot.
    pub fn set_monitor_trap(&mut self, caps: &VmxCaps, on: bool) -> bool {
        if caps.proc1.may_be_1 & proc1::MONITOR_TRAP_FLAG == 0 {
            return self.set_trap_flag_step(on);
        }
        let want = toggled(self.proc1, proc1::MONITOR_TRAP_FLAG, on);
        set_control(&caps.proc1, PRIMARY_CONTROLS, want, &mut self.proc1)
    }

    /// Writes a VMCS field of this vCPU (for the mechanisms in `vm`).
    ///
    /// # Safety
    /// The VMCS is current and the value cannot harm the host (the caller
    /// checked it: a frame the domain owns, a guest-state value).
    pub unsafe fn write(&mut self, field: u32, value: u64) {
        // Safety: the caller's contract.
        unsafe {
            let _ = vmwrite(field, value);
        }
    }

    /// Reads a VMCS field of this vCPU.
    pub fn read(&self, field: u32) -> u64 {
        // Safety: the VMCS is current (every caller runs between `load` and
        // the next `load` of another vCPU).
        unsafe { vmread(field) }
    }

    /// VM fork: this vCPU takes `from`'s state (its VMCS guest state,
    /// general registers, the state VMX does not switch, its TPR), on view
    /// 0, without #VE or PML. Leaves this VMCS current.
    pub fn copy_from(&mut self, from: &Vcpu) -> Result<(), VmxError> {
        let mut values = [0u64; FORK_FIELDS.len()];
        from.load()?;
        for (v, &f) in values.iter_mut().zip(FORK_FIELDS.iter()) {
            *v = from.read(f);
        }
        let long = from.read(ENTRY_CONTROLS) & u64::from(entry::IA32E_MODE_GUEST);
        super::cpustate::flush(from.save_area);
        super::cpustate::forget(self.save_area);
        let pages = [
            Some((from.save_area, self.save_area)),
            from.virtual_apic.zip(self.virtual_apic),
        ];
        for (src, dst) in pages.into_iter().flatten() {
            // Safety: two distinct frames these vCPUs own, in the direct
            // map; neither is in use by the CPU now (flushed and forgotten).
            unsafe {
                core::ptr::copy_nonoverlapping(
                    crate::mem::phys_to_virt(src),
                    crate::mem::phys_to_virt(dst),
                    4096,
                )
            };
        }
        self.load()?;
        // Safety: this VMCS is current; the values are a live vCPU's, which
        // VM entry took (or will take) as they are.
        unsafe {
            for (&f, &v) in FORK_FIELDS.iter().zip(values.iter()) {
                self.write(f, v);
            }
            let controls = self.read(ENTRY_CONTROLS) & !u64::from(entry::IA32E_MODE_GUEST);
            self.write(ENTRY_CONTROLS, controls | long);
        }
        self.regs = from.regs;
        // A halted parent's fork starts as if its HLT had ended (its wait
        // is the parent's, in the scheduler); its timer deadline is kept.
        self.state = VcpuState::Runnable;
        self.deadline = from.deadline;
        self.tf_step = from.tf_step;
        Ok(())
    }

    /// Gives the VMCS frame back (the vCPU must be current or cleared).
    pub fn destroy(self) {
        // Safety: VMX operation; the VMCS is ours.
        let _ = unsafe { vmx::vmclear(self.vmcs) };
        super::memory::free_frame(self.vmcs);
        super::cpustate::forget(self.save_area);
        super::memory::free_frame(self.save_area);
        if let Some(page) = self.virtual_apic {
            super::memory::free_frame(page);
        }
    }

    /// Hands over the PML buffer the CPU was writing and gives it the other,
    /// empty: (which buffer, entries in it). The VMCS must be current.
    pub fn pml_swap(&mut self) -> Option<(u8, u16)> {
        self.pml?;
        let index = self.read(GUEST_PML_INDEX) as u16;
        // The CPU decrements the index after each entry; past 0 it wraps to
        // 0xffff (the buffer is full).
        let entries = if index > PML_START as u16 {
            512
        } else {
            PML_START as u16 - index
        };
        let pml = self.pml.as_mut()?;
        let full = pml.active;
        pml.active ^= 1;
        let next = pml.frames[usize::from(pml.active)];
        // Safety: the VMCS is current; the frame is one of the two the
        // service gave for this vCPU's log (checked when PML was started),
        // and 511 is the architectural start index.
        unsafe {
            self.write(PML_ADDRESS, next);
            self.write(GUEST_PML_INDEX, PML_START);
        }
        Some((full, entries))
    }
}

/// The PML index a fresh buffer starts at (entries fill downwards).
pub const PML_START: u64 = 511;

/// A vCPU's two PML buffers: the CPU writes `frames[active]`.
#[derive(Clone, Copy, Debug)]
pub struct PmlBuffers {
    pub frames: [u64; 2],
    pub active: u8,
}

/// Host state: this CPU's kernel segments, tables and control registers,
/// loaded by every VM exit.
///
/// # Safety
/// A VMCS is current; called on the CPU that will run it.
unsafe fn write_host_state() -> Result<(), VmxError> {
    use x86_64::instructions::tables::{sgdt, sidt};
    use x86_64::registers::control::{Cr0, Cr3, Cr4};
    let gdt = sgdt();
    let idt = sidt();
    // The TSS base, from its descriptor (selector 0x28, 16 bytes).
    // Safety: the GDT is the one `percpu::init_cpu` loaded, with the TSS at 0x28.
    let tss_base = unsafe {
        let d = gdt.base.as_u64() as *const u64;
        let low = d.add(5).read();
        let high = d.add(6).read();
        ((low >> 16) & 0xff_ffff) | (((low >> 56) & 0xff) << 24) | ((high & 0xffff_ffff) << 32)
    };
    // Safety: the caller's contract; every value is this CPU's current state.
    unsafe {
        vmwrite(HOST_CR0, Cr0::read_raw())?;
        vmwrite(HOST_CR3, Cr3::read_raw().0.start_address().as_u64())?;
        vmwrite(HOST_CR4, Cr4::read_raw())?;
        vmwrite(HOST_CS_SELECTOR, 0x08)?;
        vmwrite(HOST_SS_SELECTOR, 0x10)?;
        vmwrite(HOST_DS_SELECTOR, 0x10)?;
        vmwrite(HOST_ES_SELECTOR, 0x10)?;
        vmwrite(HOST_FS_SELECTOR, 0)?;
        vmwrite(HOST_GS_SELECTOR, 0)?;
        vmwrite(HOST_TR_SELECTOR, 0x28)?;
        vmwrite(HOST_FS_BASE, platform::cpu::rdmsr(0xc000_0100))?;
        vmwrite(HOST_GS_BASE, platform::cpu::rdmsr(0xc000_0101))?;
        vmwrite(HOST_TR_BASE, tss_base)?;
        vmwrite(HOST_GDTR_BASE, gdt.base.as_u64())?;
        vmwrite(HOST_IDTR_BASE, idt.base.as_u64())?;
        vmwrite(HOST_SYSENTER_CS, 0)?;
        vmwrite(HOST_SYSENTER_ESP, 0)?;
        vmwrite(HOST_SYSENTER_EIP, 0)?;
        vmwrite(HOST_IA32_EFER, platform::cpu::rdmsr(0xc000_0080))?;
        vmwrite(HOST_IA32_PAT, platform::cpu::rdmsr(0x277))?;
        vmwrite(HOST_RIP, run::exit_landing())?;
    }
    Ok(())
}

/// Guest state at the multiboot entry point.
///
/// # Safety
/// A VMCS is current.
unsafe fn write_guest_state(setup: &VcpuSetup) -> Result<(), VmxError> {
    const _: () = assert!(
        GUEST_GS_SELECTOR == GUEST_ES_SELECTOR + 10
            && GUEST_GS_BASE == GUEST_ES_BASE + 10
            && GUEST_GS_LIMIT == GUEST_ES_LIMIT + 10
            && GUEST_GS_ACCESS == GUEST_ES_ACCESS + 10
    );
    const CODE32: u64 = 0xc09b; // present, DPL 0, execute/read, accessed, 32-bit, 4 KiB granularity
    const DATA32: u64 = 0xc093; // present, DPL 0, read/write, accessed, 32-bit, 4 KiB granularity
    // Safety: the caller's contract; these are architecturally valid values
    // for a 32-bit protected-mode guest without paging.
    unsafe {
        vmwrite(GUEST_CR0, 0x31)?; // PE, ET, NE
        vmwrite(GUEST_CR3, 0)?;
        vmwrite(GUEST_CR4, CR4_HOST_OWNED)?;
        vmwrite(GUEST_DR7, 0x400)?;
        vmwrite(GUEST_RSP, 0)?;
        vmwrite(GUEST_RIP, u64::from(setup.entry))?;
        vmwrite(GUEST_RFLAGS, 0x2)?;
        // ES, CS, SS, DS, FS, GS: in this order, two apart, in each group of
        // fields (selectors, bases, limits, access rights).
        for i in 0..6 {
            let (selector, rights) = if i == 1 {
                (0x08, CODE32)
            } else {
                (0x10, DATA32)
            };
            vmwrite(GUEST_ES_SELECTOR + 2 * i, selector)?;
            vmwrite(GUEST_ES_BASE + 2 * i, 0)?;
            vmwrite(GUEST_ES_LIMIT + 2 * i, 0xffff_ffff)?;
            vmwrite(GUEST_ES_ACCESS + 2 * i, rights)?;
        }
        vmwrite(GUEST_LDTR_SELECTOR, 0)?;
        vmwrite(GUEST_LDTR_BASE, 0)?;
        vmwrite(GUEST_LDTR_LIMIT, 0)?;
        vmwrite(GUEST_LDTR_ACCESS, 1 << 16)?; // unusable
        vmwrite(GUEST_TR_SELECTOR, 0)?;
        vmwrite(GUEST_TR_BASE, 0)?;
        vmwrite(GUEST_TR_LIMIT, 0xff)?;
        vmwrite(GUEST_TR_ACCESS, 0x8b)?; // present, 32-bit busy TSS
        vmwrite(GUEST_GDTR_BASE, 0)?;
        vmwrite(GUEST_GDTR_LIMIT, 0xffff)?;
        vmwrite(GUEST_IDTR_BASE, 0)?;
        vmwrite(GUEST_IDTR_LIMIT, 0xffff)?;
        vmwrite(GUEST_IA32_DEBUGCTL, 0)?;
        vmwrite(GUEST_IA32_PAT, 0x0007_0406_0007_0406)?;
        vmwrite(GUEST_IA32_EFER, 0)?;
        vmwrite(GUEST_SYSENTER_CS, 0)?;
        vmwrite(GUEST_SYSENTER_ESP, 0)?;
        vmwrite(GUEST_SYSENTER_EIP, 0)?;
        vmwrite(GUEST_INTERRUPTIBILITY, 0)?;
        vmwrite(GUEST_ACTIVITY_STATE, 0)?;
        vmwrite(GUEST_PENDING_DEBUG, 0)?;
    }
    Ok(())
}

/// Writes execution-control field `field` as `want` (and records it in
/// `mine`) if the CPU allows that value (`caps`); whether it did.
fn set_control(caps: &platform::vmx::Controls, field: u32, want: u32, mine: &mut u32) -> bool {
    let Ok(v) = caps.value_for(want) else {
        return false;
    };
    // Safety: the VMCS is current (the callers' contract); the value is
    // allowed by the CPU.
    let _ = unsafe { vmwrite(field, u64::from(v)) };
    *mine = want;
    true
}

/// `controls` with `bits` set (`on`) or clear.
fn toggled(controls: u32, bits: u32, on: bool) -> u32 {
    if on {
        controls | bits
    } else {
        controls & !bits
    }
}
