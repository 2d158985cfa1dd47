use super::*;
use ipc_schema::manifest::{Disposition, Manifest};
use proptest::prelude::*;

fn parse(text: &str) -> Result<SystemManifest> {
    SystemManifest::parse(text, Path::new("test.toml"))
}

fn error(text: &str) -> String {
    format!("{:#}", parse(text).unwrap_err())
}

const DOMAIN: &str = "[[domain]]\nname = \"a\"\nguest = \"g\"\nmemory_mib = 1\n";

/// One service receiving on `exits` and `violations`, plus `extra` handles.
fn service(extra: &str) -> String {
    format!(
        "name = \"x\"\n[[service]]\nname = \"s\"\nhandles = [\n{{ name = \"e\", endpoint = \"exits\", rights = [\"receive\"] }},\n{{ name = \"v\", endpoint = \"violations\", rights = [\"receive\"] }},\n{extra}]\n"
    )
}

#[test]
fn compiles_what_init_reads() {
    let m = parse(
        r#"
        name = "demo"
        [[domain]]
        name = "one"
        guest = "hello"
        memory_mib = 16
        [[domain]]
        name = "two"
        guest = "hello"
        memory_mib = 32
        vcpus = 2
        cmdline = "verbose"
        "#,
    )
    .unwrap();
    assert_eq!(m.guests(), ["hello"]);
    let bytes = m.compile().unwrap();
    let k = Manifest::decode(&bytes).unwrap();
    assert_eq!(k.name, "demo");
    assert_eq!(k.domains.len(), 2);
    assert_eq!(
        (
            k.domains[1].memory_mib,
            k.domains[1].vcpus,
            k.domains[1].cmdline
        ),
        (32, 2, "verbose")
    );
    assert_eq!(k.domains[0].vcpus, 1, "vcpus defaults to 1");
    assert_eq!(
        (k.domains[0].exits, k.domains[0].violations),
        ("exits", "violations")
    );
}

#[test]
fn without_services_the_standard_ones_are_used() {
    let m = parse("name = \"x\"").unwrap();
    let names: Vec<&str> = m.services.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "altp2m",
            "vmm",
            "console",
            "logdirty",
            "introspect",
            "sharing"
        ]
    );
    assert_eq!(
        m.shared,
        [
            SharedSpec {
                name: "swap".into(),
                pages: 256
            },
            SharedSpec {
                name: "pml".into(),
                pages: 32
            }
        ]
    );
    let bytes = m.compile().unwrap();
    let k = Manifest::decode(&bytes).unwrap();
    let vmm = &k.services[1];
    assert_eq!(
        (vmm.name, vmm.module, vmm.disposition),
        ("vmm", "vmm", Disposition::Restart)
    );
    assert_eq!((vmm.max_restarts, vmm.restart_window_ms), (3, 10_000));
    let domains = vmm.handles.iter().find(|h| h.name == "domains").unwrap();
    assert_eq!(domains.object, ipc_schema::manifest::Object::Domains);
    assert_eq!(domains.rights, rights::READ | rights::WRITE | rights::VCPUS);
    let console = &k.services[2];
    assert!(console.handles.iter().any(|h| h.object
        == ipc_schema::manifest::Object::IoPorts {
            base: 0x2f8,
            count: 8
        }));
    // The console reaches the logdirty service for the host.
    let to_logdirty = console
        .handles
        .iter()
        .find(|h| h.name == "logdirty")
        .unwrap();
    assert_eq!(
        (to_logdirty.object.clone(), to_logdirty.rights),
        (
            ipc_schema::manifest::Object::Endpoint("logdirty"),
            rights::CALL
        )
    );
    let logdirty = &k.services[3];
    let grant = |name: &str| {
        let h = logdirty.handles.iter().find(|h| h.name == name).unwrap();
        (h.object.clone(), h.rights)
    };
    use ipc_schema::manifest::Object as O;
    assert_eq!(
        grant("logdirty"),
        (O::Endpoint("logdirty"), rights::RECEIVE)
    );
    assert_eq!(
        grant("pml-exits"),
        (O::Endpoint("pml-exits"), rights::RECEIVE)
    );
    // Tracking on altp2m's own endpoint for it (docs/p2m.md).
    assert_eq!(grant("altp2m"), (O::Endpoint("altp2m-track"), rights::CALL));
    assert_eq!(grant("domains"), (O::Domains, rights::READ | rights::VCPUS));
    // The CPU writes the buffers: the kernel takes only frames the service
    // may write itself.
    assert_eq!(
        grant("pml"),
        (O::Shared("pml"), rights::READ | rights::WRITE)
    );
    assert_eq!(
        grant("supervisor"),
        (O::Endpoint("supervisor"), rights::CALL)
    );
    assert_eq!(
        grant("supervisor-events"),
        (O::Notification("supervisor-events-logdirty"), rights::WAIT),
        "its own: a notification has one waiter, and the console waits on `supervisor-events`"
    );
}

#[test]
fn a_manifest_with_its_own_services_is_compiled_as_written() {
    let text =
        service("{ name = \"note\", notification = \"n\", rights = [\"wait\", \"signal\"] },")
            + "on_fault = \"hold\"\nmax_restarts = 1\n"
            + DOMAIN;
    let m = parse(&text).unwrap();
    let bytes = m.compile().unwrap();
    let k = Manifest::decode(&bytes).unwrap();
    assert_eq!(k.services.len(), 1);
    assert_eq!(k.services[0].disposition, Disposition::Hold);
    assert_eq!(
        k.services[0].handles[2].object,
        ipc_schema::manifest::Object::Notification("n")
    );
    assert_eq!(
        k.services[0].handles[2].rights,
        rights::WAIT | rights::SIGNAL
    );
    assert!(
        k.shared.is_empty(),
        "the standard shared objects come only with the standard services"
    );
}

#[test]
fn errors_name_the_file_and_the_field() {
    let e = error(&format!(
        "name = \"x\"\n{}",
        DOMAIN.replace("memory_mib = 1", "memory_mib = 0")
    ));
    assert!(
        e.contains("test.toml") && e.contains("domain 1 (`a`): memory_mib = 0"),
        "{e}"
    );
    let e = error(&format!("name = \"x\"\n{DOMAIN}vcpus = 99\n"));
    assert!(e.contains("vcpus = 99 is out of range"), "{e}");
    let e = error("name = \"x\"\ncolour = \"blue\"\n");
    assert!(e.contains("unknown field `colour`"), "{e}");
    let e = error("name = \"x\"\n[[domain]]\nname = \"a\"\nmemory_mib = 1\n");
    assert!(
        e.contains(
            "domain 1 (`a`): no image: give guest = \"NAME\" (a guest crate) or kernel = \"PATH\""
        ),
        "{e}"
    );
    let e = error("name = \"Bad Name\"");
    assert!(e.contains("the system name is \"Bad Name\""), "{e}");
    let e = error(&format!("name = \"x\"\n{DOMAIN}{DOMAIN}"));
    assert!(
        e.contains("domain 2 (`a`): another domain has the same name"),
        "{e}"
    );
    let e = error("name = \"x\"\n[[domain]\n");
    assert!(e.contains("test.toml is not a valid manifest"), "{e}");
}

#[test]
fn handle_mistakes_are_named() {
    let cases = [
        (
            "{ name = \"h\", endpoint = \"a\", irq = 3, rights = [\"call\"] },",
            "handle `h`: a handle names exactly one object",
        ),
        ("{ name = \"h\", rights = [\"call\"] },", "this one names 0"),
        (
            "{ name = \"h\", endpoint = \"exits\", rights = [\"fly\"] },",
            "unknown right \"fly\" (rights are call, receive",
        ),
        (
            "{ name = \"h\", endpoint = \"exits\", rights = [\"device\"] },",
            "right \"device\" means nothing for this object (it takes call, receive)",
        ),
        (
            "{ name = \"h\", endpoint = \"exits\", rights = [] },",
            "rights = [] grants nothing",
        ),
        (
            "{ name = \"h\", io_ports = [0x3f8, 1], rights = [\"device\"] },",
            "includes COM1",
        ),
        (
            "{ name = \"h\", io_ports = [0xffff, 2], rights = [\"device\"] },",
            "is not a range of ports",
        ),
        (
            "{ name = \"h\", irq = 16, rights = [\"device\"] },",
            "irq = 16: only ISA lines 0 to 15",
        ),
        (
            "{ name = \"h\", shared = \"nothing\", rights = [\"read\"] },",
            "no [[shared]] object is named `nothing`",
        ),
        (
            "{ name = \"lifecycle\", domains = true, rights = [\"read\"] },",
            "the name is reserved",
        ),
        (
            "{ name = \"e\", domains = true, rights = [\"read\"] },",
            "another handle of this service has the same name",
        ),
        (
            "{ name = \"h\", endpoint = \"supervisor\", rights = [\"receive\"] },",
            "init receives on the `supervisor` endpoint",
        ),
        (
            "{ name = \"h\", endpoint = \"lonely\", rights = [\"call\"] },",
            "nobody receives on endpoint `lonely`",
        ),
        (
            "{ name = \"h\", domain = \"zz\", rights = [\"read\"] },",
            "no [[domain]] is named `zz`",
        ),
        (
            "{ name = \"h\", endpoint = \"exits\", rights = [\"receive\"] },",
            "endpoint `exits` has 2 receivers (s, s)",
        ),
    ];
    for (handle, want) in cases {
        let e = error(&(service(handle) + DOMAIN));
        assert!(e.contains(want), "{handle}\n  gave: {e}\n  want: {want}");
    }
}

#[test]
fn service_and_domain_mistakes_are_named() {
    let e = error(&(service("") + "on_fault = \"panic\"\n"));
    assert!(e.contains("service 1 (`s`): on_fault = \"panic\""), "{e}");
    let e = error(&service("").replace("name = \"s\"", "name = \"init\""));
    assert!(e.contains("the name `init` is reserved"), "{e}");
    let e = error(&(service("") + &DOMAIN.replace("guest = \"g\"", "guest = \"s\"")));
    assert!(
        e.contains("a domain's guest image has the same name"),
        "{e}"
    );
    let e =
        error(&service("").replace("name = \"s\"", "name = \"a-very-long-service-name-indeed\""));
    assert!(e.contains("names are 1 to 24"), "{e}");
    let e = error(&(service("") + DOMAIN + "exits = \"nowhere\"\n"));
    assert!(
        e.contains(
            "domain 1 (`a`): exits = \"nowhere\": no service receives on endpoint `nowhere`"
        ),
        "{e}"
    );
    let e = error(&(service("") + "[[shared]]\nname = \"big\"\npages = 99999\n"));
    assert!(
        e.contains("shared object `big`: pages = 99999 is out of range"),
        "{e}"
    );
}

#[test]
fn a_missing_file_is_named() {
    let e = format!(
        "{:#}",
        SystemManifest::load(Path::new("/nonexistent/system.toml")).unwrap_err()
    );
    assert!(
        e.contains("cannot read the manifest /nonexistent/system.toml"),
        "{e}"
    );
}

#[test]
fn the_default_system_manifest_is_valid() {
    let m = SystemManifest::load(&crate::paths::default_manifest()).unwrap();
    assert!(!m.domains.is_empty());
    m.compile().unwrap();
}

proptest! {
    /// Arbitrary edits of a valid manifest are either accepted and compile,
    /// or refused with an error: never a panic.
    #[test]
    fn mangled_manifests_never_panic(cut in 0usize..400, insert in "[a-z0-9=\\[\\]{}\",\\n ]{0,12}") {
        let base = service("{ name = \"d\", domains = true, rights = [\"read\"] },") + DOMAIN;
        let cut = cut.min(base.len());
        let text = format!("{}{}{}", &base[..cut], insert, &base[cut..]);
        if let Ok(m) = parse(&text) {
            m.compile().unwrap();
        }
    }
}

#[test]
fn the_standard_services_can_be_combined_with_others() {
    let text = "name = \"x\"\nstandard_services = true\n[[service]]\nname = \"probe\"\ntask = true\nhandles = [{ name = \"a\", endpoint = \"altp2m\", rights = [\"call\"] }]\n";
    let m = parse(text).unwrap();
    let names: Vec<&str> = m.services.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "altp2m",
            "vmm",
            "console",
            "logdirty",
            "introspect",
            "sharing",
            "probe"
        ]
    );
    let bytes = m.compile().unwrap();
    assert!(Manifest::decode(&bytes).unwrap().services[6].task);
    // And left out: a system of no services at all.
    let m = parse("name = \"x\"\nstandard_services = false\n").unwrap();
    assert!(m.services.is_empty() && m.shared.is_empty());
}

#[test]
fn introspection_defaults_to_the_host_and_bad_entries_are_named() {
    use ipc_schema::manifest::introspection::{ALL, EVENTS, READ};
    let text = format!(
        "{}{DOMAIN}introspection = [{{ service = \"s\", rights = [\"read\", \"events\"] }}]\n{}",
        service(""),
        DOMAIN.replace("name = \"a\"", "name = \"b\"")
    );
    let m = parse(&text).unwrap();
    let bytes = m.compile().unwrap();
    let k = Manifest::decode(&bytes).unwrap();
    assert_eq!(k.domains[0].introspection.len(), 1);
    assert_eq!(
        (
            k.domains[0].introspection[0].service,
            k.domains[0].introspection[0].rights
        ),
        ("s", READ | EVENTS)
    );
    assert_eq!(
        (
            k.domains[1].introspection[0].service,
            k.domains[1].introspection[0].rights
        ),
        ("console", ALL),
        "absent: the host may do everything"
    );
    let e = error(&format!(
        "{}{DOMAIN}introspection = [{{ service = \"nobody\", rights = [\"read\"] }}]\n",
        service("")
    ));
    assert!(
        e.contains("introspection: no service is named `nobody`"),
        "{e}"
    );
    let e = error(&format!(
        "{}{DOMAIN}introspection = [{{ service = \"s\", rights = [\"peek\"] }}]\n",
        service("")
    ));
    assert!(e.contains("no right `peek`"), "{e}");
    let e = error(&format!(
        "{}{DOMAIN}introspection = [{{ service = \"s\", rights = [] }}, {{ service = \"s\", rights = [\"read\"] }}]\n",
        service("")
    ));
    assert!(e.contains("`s` is named twice"), "{e}");
    let m = parse(&format!("{}{DOMAIN}introspection = []\n", service(""))).unwrap();
    let k = m.compile().unwrap();
    assert!(
        Manifest::decode(&k).unwrap().domains[0]
            .introspection
            .is_empty()
    );
}

#[test]
fn protected_is_compiled_and_defaults_to_false() {
    let text = format!(
        "{}{DOMAIN}protected = true\n{}",
        service(""),
        DOMAIN.replace("name = \"a\"", "name = \"b\"")
    );
    let k = parse(&text).unwrap().compile().unwrap();
    let k = Manifest::decode(&k).unwrap();
    assert!(k.domains[0].protected && !k.domains[1].protected);
    let e = error(&format!("{}{DOMAIN}protected = \"yes\"\n", service("")));
    assert!(e.contains("protected"), "{e}");
}

#[test]
fn devices_are_compiled_and_bad_or_doubly_assigned_ones_named() {
    // Issue 12, points 3 and 9.
    let text = format!(
        "{}{DOMAIN}devices = [\"00:03.0\", \"0001:02:1f.7\"]\n",
        service(
            "{ name = \"pci\", iommu = true, rights = [\"create\", \"device\"] },\n{ name = \"edu\", device = \"00:04.0\", rights = [\"device\"] },"
        )
        .replace("name = \"s\"\n", "name = \"s\"\ndma_clients = [\"a\"]\n")
    );
    let k = parse(&text).unwrap().compile().unwrap();
    let k = Manifest::decode(&k).unwrap();
    assert!(
        k.domains[0].devices.iter().all(|d| !d.rmrr_relaxed),
        "strict by default"
    );
    let d: Vec<_> = k.domains[0].devices.iter().map(|d| d.device).collect();
    assert_eq!((d[0].segment, d[0].source), (0, 3 << 3));
    assert_eq!(
        (d[1].segment, d[1].bus(), d[1].device(), d[1].function()),
        (1, 2, 0x1f, 7)
    );
    let s = &k.services[0];
    assert_eq!(s.dma_clients, 1, "bit 0: the first domain");
    assert_eq!(s.handles[2].object, ipc_schema::manifest::Object::Iommu);
    assert_eq!(
        s.handles[3].object,
        ipc_schema::manifest::Object::Device(ipc_schema::manifest::PciDevice {
            segment: 0,
            source: 4 << 3
        })
    );

    let e = error(&format!("{}{DOMAIN}devices = [\"00:20.0\"]\n", service("")));
    assert!(
        e.contains("domain 1 (`a`): device \"00:20.0\" is not a PCI address"),
        "{e}"
    );
    let e = error(&format!(
        "{}{DOMAIN}devices = [\"00:03.0\"]\n",
        service("{ name = \"edu\", device = \"0000:00:03.0\", rights = [\"device\"] },")
    ));
    assert!(
        e.contains("device \"0000:00:03.0\" is assigned twice: to domain `a` and to service `s` (as \"00:03.0\")"),
        "{e}"
    );
    let e = error(&format!(
        "{}{DOMAIN}devices = [\"00:03.0\", \"00:03.0\"]\n",
        service("")
    ));
    assert!(
        e.contains("is assigned twice: to domain `a` and to domain `a`"),
        "{e}"
    );
    let e = error(
        &(service("").replace("name = \"s\"\n", "name = \"s\"\ndma_clients = [\"zz\"]\n") + DOMAIN),
    );
    assert!(
        e.contains("dma_clients: no [[domain]] is named `zz`"),
        "{e}"
    );
    let e =
        error(&(service("{ name = \"h\", device = \"00:03.0\", rights = [\"read\"] },") + DOMAIN));
    assert!(
        e.contains("right \"read\" means nothing for this object (it takes device)"),
        "{e}"
    );
    let e = error(&(service("{ name = \"h\", iommu = false, rights = [\"device\"] },") + DOMAIN));
    assert!(e.contains("`iommu = false` grants nothing"), "{e}");
}

#[test]
fn rmrr_policies_are_compiled_globally_and_per_device() {
    // RMRR-5: strict by default, relaxed globally or per device; RMRR-2.
    let text = format!(
        "{}{DOMAIN}devices = [\"00:02.0\", {{ device = \"00:03.0\", rmrr_policy = \"strict\" }}]\nrmrr = \"host\"\n",
        service("")
    )
    .replacen("name = \"x\"\n", "name = \"x\"\nrmrr_policy = \"relaxed\"\n", 1);
    let k = parse(&text).unwrap().compile().unwrap();
    let d = &Manifest::decode(&k).unwrap().domains[0];
    assert!(d.devices[0].rmrr_relaxed && !d.devices[1].rmrr_relaxed);
    assert!(d.rmrr_host && d.rmrr_relaxed);
    let e = error(&format!(
        "{}{DOMAIN}devices = [{{ device = \"00:03.0\", rmrr_policy = \"lax\" }}]\n",
        service("")
    ));
    assert!(
        e.contains("device \"00:03.0\": rmrr_policy = \"lax\": it is \"strict\" or \"relaxed\""),
        "{e}"
    );
    let e = error(&format!("{}{DOMAIN}rmrr = \"all\"\n", service("")));
    assert!(
        e.contains("rmrr = \"all\": the only value is \"host\""),
        "{e}"
    );
}
