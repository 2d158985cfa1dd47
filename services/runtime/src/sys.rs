//! The system calls, one small function each (ABI: `ipc_schema::syscall`).

use core::arch::asm;
use ipc_schema::syscall::{Handle, SysError, nr};

/// What a call returned: the status and the value registers.
#[derive(Clone, Copy, Debug)]
pub struct Ret {
    pub status: u64,
    pub rdi: u64,
    pub rsi: u64,
    pub rdx: u64,
    pub r10: u64,
    pub r8: u64,
}

impl Ret {
    /// `Ok(self)` when the status is 0, else the error.
    #[inline(always)]
    pub fn ok(self) -> Result<Ret, SysError> {
        if self.status == 0 {
            Ok(self)
        } else {
            Err(SysError::from_raw(self.status).unwrap_or(SysError::UnknownCall))
        }
    }
}

/// `int 0x80` with call number `n` and arguments `a` in RDI, RSI, RDX, R10,
/// R8 (and R9 where a sixth is given): the six registers back as a [`Ret`].
macro_rules! int80 {
    ($n:expr, $a:expr $(, $r9:expr)?) => {{
        let (status, rdi, rsi, rdx, r10, r8): (u64, u64, u64, u64, u64, u64);
        let a = $a;
        // Safety: the kernel's system-call gate preserves every register
        // but RAX, RDI, RSI, RDX, R10, R8 (declared clobbered here) and
        // touches no memory of ours except buffers we pass by address,
        // which we own.
        unsafe {
            asm!(
                "int 0x80",
                inlateout("rax") $n => status,
                inlateout("rdi") a[0] => rdi,
                inlateout("rsi") a[1] => rsi,
                inlateout("rdx") a[2] => rdx,
                inlateout("r10") a[3] => r10,
                inlateout("r8") a[4] => r8,
                $(in("r9") $r9,)?
                options(nostack),
            );
        }
        Ret {
            status,
            rdi,
            rsi,
            rdx,
            r10,
            r8,
        }
    }};
}

/// `int 0x80` with six arguments.
#[inline(always)]
pub fn call6(n: u64, a: [u64; 6]) -> Ret {
    int80!(n, a, a[5])
}

/// `int 0x80` with five arguments, R9 left as it is: for a call that
/// reads no sixth (CALL, on every client's path).
#[inline(always)]
pub fn call5(n: u64, a: [u64; 5]) -> Ret {
    int80!(n, a)
}

#[inline(always)]
pub fn call(n: u64, a: &[u64]) -> Ret {
    let mut args = [0u64; 6];
    args[..a.len()].copy_from_slice(a);
    call6(n, args)
}

pub fn log(frame: &[u8]) {
    call(nr::LOG, &[frame.as_ptr() as u64, frame.len() as u64]);
}

pub fn exit(code: u64) -> ! {
    call(nr::EXIT, &[code]);
    // The kernel never returns from EXIT; if it did, fault.
    loop {
        // Safety: an undefined instruction on purpose: the service ends.
        unsafe { asm!("ud2") };
    }
}

pub fn yield_now() {
    call(nr::YIELD, &[]);
}

/// Microseconds since boot and the TSC frequency.
pub fn time() -> (u64, u64) {
    let r = call(nr::TIME, &[]);
    (r.rdi, r.rsi)
}

pub fn notify(h: Handle, bits: u64) -> Result<(), SysError> {
    call(nr::NOTIFY, &[u64::from(h), bits]).ok().map(|_| ())
}

pub fn wait(h: Handle) -> Result<u64, SysError> {
    call(nr::WAIT, &[u64::from(h)]).ok().map(|r| r.rdi)
}

pub fn io_in(h: Handle, port: u16, size: u8) -> Result<u32, SysError> {
    call(nr::IO_IN, &[u64::from(h), u64::from(port), u64::from(size)])
        .ok()
        .map(|r| r.rdi as u32)
}

pub fn io_out(h: Handle, port: u16, size: u8, value: u32) -> Result<(), SysError> {
    call(
        nr::IO_OUT,
        &[
            u64::from(h),
            u64::from(port),
            u64::from(size),
            u64::from(value),
        ],
    )
    .ok()
    .map(|_| ())
}

/// Writes `bytes` to the byte port `port`, in order, in as few calls as
/// [`IO_OUT_MAX`](ipc_schema::syscall::IO_OUT_MAX) allows.
pub fn io_out_bytes(h: Handle, port: u16, bytes: &[u8]) -> Result<(), SysError> {
    for part in bytes.chunks(ipc_schema::syscall::IO_OUT_MAX as usize) {
        call(
            nr::IO_OUT_BYTES,
            &[
                u64::from(h),
                u64::from(port),
                part.as_ptr() as u64,
                part.len() as u64,
            ],
        )
        .ok()?;
    }
    Ok(())
}

/// Creates a handle to part of `h` (I/O ports `a..a+b`, or IRQ line `a`).
pub fn derive(h: Handle, a: u64, b: u64) -> Result<Handle, SysError> {
    derive_with(h, a, b, 0)
}

/// HANDLE_DERIVE keeping only the rights in `rights` (0: all).
pub fn derive_with(h: Handle, a: u64, b: u64, rights: u32) -> Result<Handle, SysError> {
    call(nr::HANDLE_DERIVE, &[u64::from(h), a, b, u64::from(rights)])
        .ok()
        .map(|r| r.rdi as Handle)
}

/// Shorthand: a call whose only result is its status.
fn status(n: u64, a: &[u64]) -> Result<(), SysError> {
    call(n, a).ok().map(|_| ())
}

/// (frame count, meaningful bytes) of a frames object.
pub fn frames_info(h: Handle) -> Result<(u64, u64), SysError> {
    call(nr::FRAMES_INFO, &[u64::from(h)])
        .ok()
        .map(|r| (r.rdi, r.rsi))
}

/// Maps `count` frames of `h` from `first` at `va` (in the map window).
pub fn frames_map(
    h: Handle,
    first: u64,
    count: u64,
    va: u64,
    writable: bool,
) -> Result<(), SysError> {
    status(
        nr::FRAMES_MAP,
        &[u64::from(h), first, count, va, u64::from(writable)],
    )
}

pub fn frames_unmap(va: u64, count: u64) -> Result<(), SysError> {
    status(nr::FRAMES_UNMAP, &[va, count])
}

/// `count` fresh zeroed frames aligned to `align` frames, from the pool.
/// Frees handle slot `handle` (the object itself lives on).
pub fn handle_close(handle: Handle) -> Result<(), SysError> {
    call(nr::HANDLE_CLOSE, &[u64::from(handle)])
        .ok()
        .map(|_| ())
}

pub fn frames_alloc(pool: Handle, count: u64, align: u64) -> Result<Handle, SysError> {
    call(nr::FRAMES_ALLOC, &[u64::from(pool), count, align])
        .ok()
        .map(|r| r.rdi as Handle)
}

pub fn endpoint_create(system: Handle) -> Result<Handle, SysError> {
    call(nr::ENDPOINT_CREATE, &[u64::from(system)])
        .ok()
        .map(|r| r.rdi as Handle)
}

pub fn notification_create(system: Handle) -> Result<Handle, SysError> {
    call(nr::NOTIFICATION_CREATE, &[u64::from(system)])
        .ok()
        .map(|r| r.rdi as Handle)
}

/// Starts a process from the ELF in `elf` (spec: a postcard `SpawnSpec`).
pub fn spawn(elf: Handle, spec: &[u8]) -> Result<Handle, SysError> {
    call(
        nr::PROCESS_SPAWN,
        &[u64::from(elf), spec.as_ptr() as u64, spec.len() as u64],
    )
    .ok()
    .map(|r| r.rdi as Handle)
}

/// Restarts a process (same ELF unless `elf` is given); its new generation.
pub fn restart(process: Handle, elf: Option<Handle>) -> Result<u32, SysError> {
    let e = elf.map_or(u64::from(u32::MAX), u64::from);
    call(nr::PROCESS_RESTART, &[u64::from(process), e])
        .ok()
        .map(|r| r.rdi as u32)
}

pub fn kill(process: Handle) -> Result<(), SysError> {
    status(nr::PROCESS_KILL, &[u64::from(process)])
}

/// (state: 0 running, 1 faulted, 2 ended; generation; faults).
pub fn process_status(process: Handle) -> Result<(u64, u32, u32), SysError> {
    call(nr::PROCESS_STATUS, &[u64::from(process)])
        .ok()
        .map(|r| (r.rdi, r.rsi as u32, r.rdx as u32))
}

pub fn fault_watch(process: Handle, note: Handle, bit: u64) -> Result<(), SysError> {
    status(nr::FAULT_WATCH, &[u64::from(process), u64::from(note), bit])
}

/// Ends the run with `status` (a `halt::HaltStatus` code).
pub fn halt(system: Handle, status: u8) -> ! {
    call(nr::HALT, &[u64::from(system), u64::from(status)]);
    exit(0)
}

pub fn domain_create(domains: Handle, name: &str) -> Result<u16, SysError> {
    domain_create_with(domains, name, 0)
}

/// DOMAIN_CREATE with flags (`ipc_schema::syscall::DOMAIN_PROTECTED`).
pub fn domain_create_with(domains: Handle, name: &str, flags: u64) -> Result<u16, SysError> {
    call(
        nr::DOMAIN_CREATE,
        &[
            u64::from(domains),
            name.as_ptr() as u64,
            name.len() as u64,
            flags,
        ],
    )
    .ok()
    .map(|r| r.rdi as u16)
}

/// VM fork of paused domain `parent` (DOMAIN_FORK): the child's id.
pub fn domain_fork(domains: Handle, parent: u16, name: &str) -> Result<u16, SysError> {
    call(
        nr::DOMAIN_FORK,
        &[
            u64::from(domains),
            u64::from(parent),
            name.as_ptr() as u64,
            name.len() as u64,
        ],
    )
    .ok()
    .map(|r| r.rdi as u16)
}

pub fn domain_map_ram(
    domains: Handle,
    id: u16,
    gfn: u64,
    frames: Handle,
    count: u64,
) -> Result<(), SysError> {
    status(
        nr::DOMAIN_MAP_RAM,
        &[
            u64::from(domains),
            u64::from(id),
            gfn,
            u64::from(frames),
            count,
        ],
    )
}

pub fn domain_write(domains: Handle, id: u16, gpa: u64, bytes: &[u8]) -> Result<(), SysError> {
    status(
        nr::DOMAIN_WRITE,
        &[
            u64::from(domains),
            u64::from(id),
            gpa,
            bytes.as_ptr() as u64,
            bytes.len() as u64,
        ],
    )
}

pub fn domain_read(domains: Handle, id: u16, gpa: u64, out: &mut [u8]) -> Result<(), SysError> {
    status(
        nr::DOMAIN_READ,
        &[
            u64::from(domains),
            u64::from(id),
            gpa,
            out.as_mut_ptr() as u64,
            out.len() as u64,
        ],
    )
}

pub fn vcpu_create(domains: Handle, id: u16, spec: &[u8]) -> Result<(), SysError> {
    status(
        nr::VCPU_CREATE,
        &[
            u64::from(domains),
            u64::from(id),
            spec.as_ptr() as u64,
            spec.len() as u64,
        ],
    )
}

pub fn domain_control(
    domains: Handle,
    id: u16,
    op: ipc_schema::syscall::DomainOp,
) -> Result<(), SysError> {
    status(
        nr::DOMAIN_CONTROL,
        &[u64::from(domains), u64::from(id), op as u64],
    )
}

/// (state code, exit status, RAM bytes).
pub fn domain_info(domains: Handle, id: u16) -> Result<(u64, u32, u64), SysError> {
    call(nr::DOMAIN_INFO, &[u64::from(domains), u64::from(id)])
        .ok()
        .map(|r| (r.rdi, r.rsi as u32, r.rdx))
}

/// Which domain of all made since boot domain `id` is (DOMAIN_INFO's
/// R10): an id is given again to a new domain, a birth never.
pub fn domain_birth(domains: Handle, id: u16) -> Result<u64, SysError> {
    call(nr::DOMAIN_INFO, &[u64::from(domains), u64::from(id)])
        .ok()
        .map(|r| r.r10)
}

/// Domain `id`'s state and birth, from one DOMAIN_INFO.
pub fn domain_state_birth(domains: Handle, id: u16) -> Result<(u64, u64), SysError> {
    call(nr::DOMAIN_INFO, &[u64::from(domains), u64::from(id)])
        .ok()
        .map(|r| (r.rdi, r.r10))
}

/// What DOMAIN_INFO says of a domain beyond its state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ForeignInfo {
    /// Pages of its RAM services hold foreign-mapped.
    pub pages: u32,
    pub protected: bool,
}

/// Its foreign-mapped pages and whether it is protected (FM-1, FM-2).
pub fn domain_foreign(domains: Handle, id: u16) -> Result<ForeignInfo, SysError> {
    call(nr::DOMAIN_INFO, &[u64::from(domains), u64::from(id)])
        .ok()
        .map(|r| ForeignInfo {
            pages: ((r.rsi >> 32) & 0x7fff_ffff) as u32,
            protected: r.rsi & ipc_schema::syscall::DOMAIN_INFO_PROTECTED != 0,
        })
}

/// FOREIGN_MAP: `count` pages of domain `id`'s RAM from `gfn` at `va`
/// (in the map window), counted in the domain until unmapped.
pub fn foreign_map(
    domains: Handle,
    id: u16,
    gfn: u64,
    count: u64,
    va: u64,
    writable: bool,
) -> Result<(), SysError> {
    status(
        nr::FOREIGN_MAP,
        &[
            u64::from(domains),
            u64::from(id),
            gfn,
            count,
            va,
            u64::from(writable),
        ],
    )
}

/// FOREIGN_UNMAP: the mapping FOREIGN_MAP made at `va` of `count` pages.
pub fn foreign_unmap(va: u64, count: u64) -> Result<(), SysError> {
    status(nr::FOREIGN_UNMAP, &[va, count])
}

/// DOMAIN_GRANT: domain `id`'s guest grants pages `gfn .. gfn + count`
/// (`grant`), or no longer.
pub fn domain_grant(
    domains: Handle,
    id: u16,
    gfn: u64,
    count: u64,
    grant: bool,
) -> Result<(), SysError> {
    status(
        nr::DOMAIN_GRANT,
        &[
            u64::from(domains),
            u64::from(id),
            gfn,
            count,
            u64::from(grant),
        ],
    )
}

pub fn domain_watch(domains: Handle, note: Handle, bit: u64) -> Result<(), SysError> {
    status(
        nr::DOMAIN_WATCH,
        &[u64::from(domains), u64::from(note), bit],
    )
}

/// Console output of a guest into the log.
pub fn console(domains: Handle, id: u16, bytes: &[u8]) -> Result<(), SysError> {
    status(
        nr::CONSOLE,
        &[
            u64::from(domains),
            u64::from(id),
            bytes.as_ptr() as u64,
            bytes.len() as u64,
        ],
    )
}

pub fn view_create(domains: Handle, id: u16) -> Result<u16, SysError> {
    call(nr::VIEW_CREATE, &[u64::from(domains), u64::from(id)])
        .ok()
        .map(|r| r.rdi as u16)
}

pub fn view_destroy(domains: Handle, id: u16, view: u16) -> Result<(), SysError> {
    status(
        nr::VIEW_DESTROY,
        &[u64::from(domains), u64::from(id), u64::from(view)],
    )
}

pub fn view_set_visible(
    domains: Handle,
    id: u16,
    view: u16,
    visible: bool,
) -> Result<(), SysError> {
    status(
        nr::VIEW_SET_VISIBLE,
        &[
            u64::from(domains),
            u64::from(id),
            u64::from(view),
            u64::from(visible),
        ],
    )
}

/// Applies EPT operations (postcard `BoundedVec<EptOp, _>`); the results
/// (postcard) land in `results`; returns their length.
pub fn ept_ops(
    domains: Handle,
    id: u16,
    ops: &[u8],
    results: &mut [u8],
) -> Result<usize, SysError> {
    call6(
        nr::EPT_OPS,
        [
            u64::from(domains),
            u64::from(id),
            ops.as_ptr() as u64,
            ops.len() as u64,
            results.as_mut_ptr() as u64,
            results.len() as u64,
        ],
    )
    .ok()
    .map(|r| r.rdi as usize)
}

pub fn vcpu_set_view(domains: Handle, id: u16, vcpu: u16, view: u16) -> Result<(), SysError> {
    status(
        nr::VCPU_SET_VIEW,
        &[
            u64::from(domains),
            u64::from(id),
            u64::from(vcpu),
            u64::from(view),
        ],
    )
}

pub fn vcpu_control(
    domains: Handle,
    id: u16,
    vcpu: u16,
    op: ipc_schema::syscall::VcpuOp,
    arg: u64,
) -> Result<(), SysError> {
    vcpu_call(domains, id, vcpu, op, arg).map(|_| ())
}

fn vcpu_call(
    domains: Handle,
    id: u16,
    vcpu: u16,
    op: ipc_schema::syscall::VcpuOp,
    arg: u64,
) -> Result<Ret, SysError> {
    call(
        nr::VCPU_CONTROL,
        &[
            u64::from(domains),
            u64::from(id),
            u64::from(vcpu),
            op as u64,
            arg,
        ],
    )
    .ok()
}

/// PML on for vCPU `vcpu` of domain `id`: its two buffers are frames
/// `first` and `first + 1` of `frames` (a handle of the caller's), and a
/// full buffer is sent to `endpoint` (one the caller receives on).
pub fn pml_start(
    domains: Handle,
    id: u16,
    vcpu: u16,
    frames: Handle,
    first: u32,
    endpoint: Handle,
) -> Result<(), SysError> {
    status(
        nr::VCPU_CONTROL,
        &[
            u64::from(domains),
            u64::from(id),
            u64::from(vcpu),
            ipc_schema::syscall::VcpuOp::PmlStart as u64,
            u64::from(frames) | (u64::from(first) << 32),
            u64::from(endpoint),
        ],
    )
}

/// Takes the PML buffer the CPU was writing: (entries, which buffer).
pub fn pml_take(domains: Handle, id: u16, vcpu: u16) -> Result<(u16, u8), SysError> {
    let op = ipc_schema::syscall::VcpuOp::PmlTake;
    vcpu_call(domains, id, vcpu, op, 0).map(|r| (r.rdi as u16, r.rsi as u8))
}

/// The guest memory the kernel wrote for services since the last take, as
/// (gfn, pages) pairs into `out`: (pairs, whether some were not recorded).
pub fn domain_writes(
    domains: Handle,
    id: u16,
    out: &mut [[u64; 2]],
) -> Result<(usize, bool), SysError> {
    take(
        nr::DOMAIN_WRITES,
        domains,
        id,
        out.as_mut_ptr() as u64,
        out.len(),
    )
}

/// A call that fills `len` entries at `ptr` with what a domain recorded:
/// (how many, whether more remain or some were lost).
fn take(n: u64, domains: Handle, id: u16, ptr: u64, len: usize) -> Result<(usize, bool), SysError> {
    call(n, &[u64::from(domains), u64::from(id), ptr, len as u64])
        .ok()
        .map(|r| (r.rdi as usize, r.rsi != 0))
}

pub fn irq_bind(irq: Handle, note: Handle, bit: u64) -> Result<(), SysError> {
    status(nr::IRQ_BIND, &[u64::from(irq), u64::from(note), bit])
}

/// (active view, VM exits so far) of a vCPU.
pub fn vcpu_info(domains: Handle, id: u16, vcpu: u16) -> Result<(u16, u64), SysError> {
    call(
        nr::VCPU_INFO,
        &[u64::from(domains), u64::from(id), u64::from(vcpu)],
    )
    .ok()
    .map(|r| (r.rdi as u16, r.rsi))
}

/// Every register of a vCPU (`ipc_schema::syscall::regs` order).
pub fn vcpu_regs(
    domains: Handle,
    id: u16,
    vcpu: u16,
) -> Result<[u64; ipc_schema::syscall::regs::COUNT], SysError> {
    let mut out = [0u64; ipc_schema::syscall::regs::COUNT];
    let a = [
        u64::from(domains),
        u64::from(id),
        u64::from(vcpu),
        out.as_mut_ptr() as u64,
        0,
    ];
    call(nr::VCPU_REGS, &a).ok()?;
    Ok(out)
}

/// Why a register set was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SetRegsError {
    /// VM entry would refuse the value of this register (by index).
    Refused(usize),
    Sys(SysError),
}

/// Sets the registers of `mask` (bits by index) to `values` (the domain
/// paused).
pub fn vcpu_set_regs(
    domains: Handle,
    id: u16,
    vcpu: u16,
    values: &[u64; ipc_schema::syscall::regs::COUNT],
    mask: u64,
) -> Result<(), SetRegsError> {
    let a = [
        u64::from(domains),
        u64::from(id),
        u64::from(vcpu),
        values.as_ptr() as u64,
        mask,
    ];
    let r = call(nr::VCPU_REGS, &a);
    match r.ok() {
        Ok(_) => Ok(()),
        Err(SysError::BadArgument) if r.rdi >> 63 == 1 => {
            Err(SetRegsError::Refused((r.rdi & 0xff) as usize))
        }
        Err(e) => Err(SetRegsError::Sys(e)),
    }
}

/// `ipc_schema::syscall::vm_features` bits.
pub fn vm_features() -> u64 {
    call(nr::VM_FEATURES, &[]).rdi
}

/// Frames whose armed entries a write lifted (`EptOp::ArmLift`), into
/// `out`: (how many, more remain).
pub fn lifted_take(domains: Handle, id: u16, out: &mut [u64]) -> Result<(usize, bool), SysError> {
    take(
        nr::LIFTED_TAKE,
        domains,
        id,
        out.as_mut_ptr() as u64,
        out.len(),
    )
}

/// IOSPACE_CREATE: new, empty DMA page tables (an IoSpace handle).
pub fn iospace_create(iommu: Handle) -> Result<Handle, SysError> {
    Ok(call(nr::IOSPACE_CREATE, &[u64::from(iommu)]).ok()?.rdi as Handle)
}

/// IOSPACE_ATTACH: the device's DMA goes through the IoSpace (`attach`)
/// or is blocked again.
pub fn iospace_attach(space: Handle, device: Handle, attach: bool) -> Result<(), SysError> {
    call(
        nr::IOSPACE_ATTACH,
        &[u64::from(space), u64::from(device), u64::from(attach)],
    )
    .ok()
    .map(|_| ())
}

/// IOSPACE_MAP: (gfn, bfn) pairs of domain `id`, all or none.
pub fn iospace_map(
    space: Handle,
    domains: Handle,
    id: u16,
    pairs: &[(u64, u64)],
    writable: bool,
) -> Result<(), SysError> {
    let mut raw = [0u64; 2 * 64];
    for chunk in pairs.chunks(64) {
        for (i, &(g, b)) in chunk.iter().enumerate() {
            raw[2 * i] = g;
            raw[2 * i + 1] = b;
        }
        call(
            nr::IOSPACE_MAP,
            &[
                u64::from(space),
                u64::from(domains),
                u64::from(id),
                raw.as_ptr() as u64,
                chunk.len() as u64,
                u64::from(writable),
            ],
        )
        .ok()?;
    }
    Ok(())
}

/// IOSPACE_MAP with the pairs laid out as the kernel reads them (gfn, bfn
/// u64 pairs, at most `IO_BATCH`): one call.
pub fn iospace_map_raw(
    space: Handle,
    domains: Handle,
    id: u16,
    pairs: &[[u64; 2]],
    writable: bool,
) -> Result<(), SysError> {
    call(
        nr::IOSPACE_MAP,
        &[
            u64::from(space),
            u64::from(domains),
            u64::from(id),
            pairs.as_ptr() as u64,
            pairs.len() as u64,
            u64::from(writable),
        ],
    )
    .ok()
    .map(|_| ())
}

/// IOSPACE_UNMAP: (pages unmapped, IOTLB invalidations issued); returns
/// once the invalidation has completed.
pub fn iospace_unmap(space: Handle, bfns: &[u64]) -> Result<(u64, u64), SysError> {
    let r = call(
        nr::IOSPACE_UNMAP,
        &[u64::from(space), bfns.as_ptr() as u64, bfns.len() as u64],
    )
    .ok()?;
    Ok((r.rdi, r.rsi))
}

/// IOMMU_FAULTS: fault records into `out`: (records, IOTLB invalidations
/// since boot, faults lost).
pub fn iommu_faults(
    iommu: Handle,
    out: &mut [ipc_schema::syscall::IoFault],
) -> Result<(usize, u64, u64), SysError> {
    let mut raw = [[0u8; 16]; 16];
    let n = out.len().min(raw.len());
    let r = call(
        nr::IOMMU_FAULTS,
        &[u64::from(iommu), raw.as_mut_ptr() as u64, (n * 16) as u64],
    )
    .ok()?;
    let got = (r.rdi as usize).min(n);
    for (o, b) in out.iter_mut().zip(&raw[..got]) {
        *o = ipc_schema::syscall::IoFault::from_bytes(b);
    }
    Ok((got, r.rsi, r.rdx))
}

/// IOMMU_RMRR: reserved region `index`: (first byte, last byte, device
/// scopes written to `scopes` as segment << 16 | source id).
pub fn iommu_rmrr(
    iommu: Handle,
    index: u64,
    scopes: &mut [u32],
) -> Result<(u64, u64, usize), SysError> {
    let r = call(
        nr::IOMMU_RMRR,
        &[
            u64::from(iommu),
            index,
            scopes.as_mut_ptr() as u64,
            (scopes.len() * 4) as u64,
            0,
        ],
    )
    .ok()?;
    Ok((r.rdi, r.rsi, r.rdx as usize))
}

/// DEVICE_CONFIG read: `size` (1, 2 or 4) bytes at `offset` of the
/// Device handle's configuration space.
pub fn device_config_read(device: Handle, offset: u16, size: u8) -> Result<u32, SysError> {
    use ipc_schema::syscall::device_config::READ;
    let a = [
        u64::from(device),
        u64::from(offset),
        u64::from(size),
        READ,
        0,
    ];
    Ok(call(nr::DEVICE_CONFIG, &a).ok()?.rdi as u32)
}

/// DEVICE_CONFIG write (the kernel refuses BARs, the ROM BAR, a bridge's
/// routing registers and MSI/MSI-X; see `nr::DEVICE_CONFIG`).
pub fn device_config_write(
    device: Handle,
    offset: u16,
    size: u8,
    value: u32,
) -> Result<(), SysError> {
    use ipc_schema::syscall::device_config::WRITE;
    let a = [
        u64::from(device),
        u64::from(offset),
        u64::from(size),
        WRITE,
        u64::from(value),
    ];
    call(nr::DEVICE_CONFIG, &a).ok()?;
    Ok(())
}

/// DEVICE_CONFIG probe: what BAR (or ROM BAR) register `offset` reads
/// after all ones are written (its size bits), the BAR left where it was.
pub fn device_config_probe(device: Handle, offset: u16) -> Result<u32, SysError> {
    use ipc_schema::syscall::device_config::PROBE;
    let a = [u64::from(device), u64::from(offset), 4, PROBE, 0];
    Ok(call(nr::DEVICE_CONFIG, &a).ok()?.rdi as u32)
}

/// DEVICE_RESET: resets the PCI function of a Device handle; how (see
/// `nr::DEVICE_RESET`: 0 FLR, 1 AF FLR, 2 secondary bus reset, 3 bus
/// mastering cycled).
///
/// The kernel resets in steps and returns between them with the time to
/// wait (RSI, µs); this waits it out here (yielding: other processes and
/// guests run meanwhile) and calls again until the reset is done.
pub fn device_reset(device: Handle) -> Result<u64, SysError> {
    loop {
        let r = call(nr::DEVICE_RESET, &[u64::from(device)]).ok()?;
        if r.rsi == 0 {
            return Ok(r.rdi);
        }
        let until = time().0.saturating_add(r.rsi);
        while time().0 < until {
            yield_now();
        }
    }
}

/// IOMMU_RMRR with frames: a Frames handle of exactly reserved region
/// `index`, for DOMAIN_MAP_RAM at gfn = frame.
pub fn iommu_rmrr_frames(iommu: Handle, index: u64) -> Result<Handle, SysError> {
    Ok(call(nr::IOMMU_RMRR, &[u64::from(iommu), index, 0, 0, 1])
        .ok()?
        .rdi as Handle)
}
