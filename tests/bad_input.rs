//! Bad boot input: each case ends in a clear, decoded message and a clean
//! stop with a status that says what kind of problem it was; never a hang or
//! a triple fault.

use image_builder::emulator::{Machine, RunEnd};
use image_builder::iso::Module;
use ipc_schema::halt::HaltStatus;
use ipc_schema::manifest::MANIFEST_KEY;
use parallax_tests::{boot, cargo_hv, empty_system, image, manifest, module, standard_services};

/// `modules` plus init and the standard services.
fn with_services(mut modules: Vec<Module>) -> Vec<Module> {
    modules.extend(standard_services());
    modules
}

const ONE_DOMAIN: &str = r#"
name = "test"
[[domain]]
name = "demo"
guest = "hello"
memory_mib = 16
"#;

#[test]
fn a_missing_guest_module_is_named() {
    let img = image(
        "missing-guest",
        "",
        with_services(vec![module("manifest", manifest(ONE_DOMAIN))]),
    );
    boot(&img, Machine::Qemu, |_| {})
        .expect_from("init", "manifest: system test, 6 service(s), 1 domain(s)")
        .expect_from(
            "init",
            "boot module `hello` is missing: the manifest names it as a guest image",
        )
        .expect_status(HaltStatus::BadBootInput);
}

#[test]
fn a_missing_manifest_is_named() {
    let img = image(
        "no-manifest",
        "",
        with_services(vec![module("motd", b"x".to_vec())]),
    );
    boot(&img, Machine::Qemu, |_| {})
        .expect_from("init", "boot module `manifest` is missing")
        .expect_status(HaltStatus::BadBootInput);
}

#[test]
fn a_corrupt_manifest_is_refused_with_the_reason() {
    let garbage = image(
        "manifest-garbage",
        "",
        with_services(vec![module("manifest", b"\x7fELF not a manifest".to_vec())]),
    );
    boot(&garbage, Machine::Qemu, |_| {})
        .expect_from(
            "init",
            "boot module `manifest` is not a usable manifest: NotAManifest",
        )
        .expect_status(HaltStatus::BadBootInput);

    let mut other_schema = manifest(ONE_DOMAIN);
    other_schema[4] ^= 0xff;
    let img = image(
        "manifest-key",
        "",
        with_services(vec![module("manifest", other_schema)]),
    );
    let expected: String = MANIFEST_KEY
        .to_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let run = boot(&img, Machine::Qemu, |_| {});
    run.expect_from("init", "not a usable manifest: WrongKey")
        .expect_status(HaltStatus::BadBootInput);
    assert!(
        run.0
            .lines
            .iter()
            .any(|l| l.text.contains("this init expects")
                && l.text.replace(", ", "").contains(&expected)),
        "the error names the expected key {expected}"
    );

    let mut truncated = manifest(ONE_DOMAIN);
    truncated.truncate(truncated.len() - 3);
    let img = image(
        "manifest-truncated",
        "",
        with_services(vec![module("manifest", truncated)]),
    );
    boot(&img, Machine::Qemu, |_| {})
        .expect_from("init", "not a usable manifest: Corrupt")
        .expect_status(HaltStatus::BadBootInput);
}

#[test]
fn domains_on_a_cpu_without_vmx_stop_cleanly() {
    let img = image(
        "no-vmx",
        "",
        with_services(vec![
            module("manifest", manifest(ONE_DOMAIN)),
            module("hello", b"placeholder guest".to_vec()),
        ]),
    );
    boot(&img, Machine::Qemu, |_| {})
        .expect("VMX: not available (CPUID.1:ECX.VMX[bit 5] = 0)")
        .expect_from(
            "init",
            "the manifest asks for 1 domain(s) but this CPU cannot run guests (no usable VMX)",
        )
        .expect_status(HaltStatus::Unsupported);
}

/// A machine too small for the kernel and its modules: the boot loader's
/// refusal ends the run at once, named, as bad boot input (not a wait for
/// the timeout while GRUB asks for a key).
#[test]
fn a_machine_too_small_to_load_the_kernel_is_named_at_once() {
    let img = image("too-small", "", empty_system());
    let run = boot(&img, Machine::Qemu, |cfg| cfg.memory_mib = 4);
    assert_eq!(run.0.end, RunEnd::BootLoaderFailed, "{}", run.log());
    assert_eq!(
        run.0.exit_code(),
        i32::from(HaltStatus::BadBootInput.code())
    );
    let summary = run.0.summary();
    assert!(
        summary.contains("the boot loader could not load the kernel (error: out of memory."),
        "{summary}"
    );
    // Its capture, decoded again, says it holds no halt record, and exits
    // as a run without one does.
    let out = cargo_hv(&["log"])
        .arg(&run.0.capture)
        .output()
        .expect("cargo runs");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{err}");
    assert!(err.contains("no halt record"), "{err}");
}

#[test]
fn a_kernel_exception_is_reported_then_the_run_stops() {
    let img = image("selftest-ud", "selftest=invalid-opcode", empty_system());
    boot(&img, Machine::Qemu, |_| {})
        .expect("CPU exception in the kernel: invalid opcode (#UD), vector 6, rip 0xffffffff8")
        .expect("registers: rax")
        .expect_status(HaltStatus::KernelFault);

    let img = image("selftest-pf", "selftest=page-fault", empty_system());
    boot(&img, Machine::Qemu, |_| {})
        .expect("CPU exception in the kernel: page fault (#PF), vector 14")
        .expect("cr2 0x7fffdead0000")
        .expect("page fault: read access, page not present, supervisor mode")
        .expect_status(HaltStatus::KernelFault);
}

#[test]
fn a_kernel_panic_is_reported_then_the_run_stops() {
    let img = image("selftest-panic", "selftest=panic", empty_system());
    boot(&img, Machine::Bochs, |_| {})
        .expect("kernel panic: panicked at kernel/src/main.rs")
        .expect("selftest: a deliberate panic")
        .expect_status(HaltStatus::KernelFault);
}

#[test]
fn a_guest_image_that_is_not_multiboot_fails_only_its_domain() {
    let img = image(
        "not-multiboot",
        "",
        with_services(vec![
            module(
                "manifest",
                manifest(
                    "name = \"x\"\n[[domain]]\nname = \"bad\"\nguest = \"junk\"\nmemory_mib = 16\n\
                     [[domain]]\nname = \"good\"\nguest = \"hello\"\nmemory_mib = 16\n",
                ),
            ),
            module("junk", b"this is not a multiboot kernel".repeat(100)),
            image_builder::iso::Module {
                name: "hello".into(),
                content: image_builder::iso::Content::File(parallax_tests::guest("hello")),
            },
        ]),
    );
    boot(&img, Machine::Bochs, |_| {})
        .expect_from("init", "domain `bad` could not be built: Image(NoHeader)")
        .expect("domain 2 (good) exited with status 0")
        .expect_status(HaltStatus::GuestFailed);
}

#[test]
fn more_vcpus_than_supported_is_refused_by_name() {
    let img = parallax_tests::system(
        "two-vcpus",
        "name = \"x\"\n[[domain]]\nname = \"smp\"\nguest = \"hello\"\nmemory_mib = 16\nvcpus = 2\n",
    );
    boot(&img, Machine::Bochs, |_| {})
        .expect_from(
            "init",
            "domain `smp` could not be built: TooManyVcpus { asked: 2 }",
        )
        .expect_status(HaltStatus::GuestFailed);
}

#[test]
fn a_missing_init_is_named_by_the_kernel() {
    let img = image(
        "no-init",
        "",
        vec![module("manifest", manifest(ONE_DOMAIN))],
    );
    boot(&img, Machine::Qemu, |_| {})
        .expect("boot module `init` is missing: the image has no supervisor")
        .expect_status(HaltStatus::BadBootInput);
}

#[test]
fn a_missing_service_module_is_named_by_init() {
    let mut modules = vec![module("manifest", manifest(ONE_DOMAIN))];
    modules.extend(standard_services().into_iter().filter(|m| m.name != "vmm"));
    let img = image("no-vmm", "", modules);
    boot(&img, Machine::Qemu, |_| {})
        .expect_from(
            "init",
            "boot module `vmm` is missing: the manifest names it as a service",
        )
        .expect_status(HaltStatus::BadBootInput);
}
