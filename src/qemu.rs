//! Booting an image in QEMU: the staging host (`imgbuild run`) and the boot tests.
//!
//! q35 + OVMF with a private copy of the variable store, virtio disk and NIC, user-mode
//! networking with host ports forwarded on 127.0.0.1 only. KVM is used only after a
//! probe guest has actually run under it: on some machines /dev/kvm opens fine yet every
//! guest dies at its first instruction (broken nested virtualisation).

use crate::image::tools::{self, QEMU_IMG, QEMU_SYSTEM};
use crate::image::{io_err, ImageError};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
pub const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// KVM if a probe guest runs, else TCG.
    Auto,
    Kvm,
    Tcg,
}

#[derive(Debug, Clone)]
pub enum SerialTarget {
    /// Serial console on this terminal (stdin/stdout), Ctrl-A X quits.
    Terminal,
    /// Serial output appended to a file (tests read the boot log from it).
    File(PathBuf),
}

#[derive(Debug, Clone)]
pub struct RunOptions {
    pub image: PathBuf,
    pub memory_mib: u32,
    pub cpus: u32,
    /// Keep the guest's writes in the image; otherwise they vanish when QEMU exits.
    pub persist: bool,
    /// Host port (on 127.0.0.1) forwarded to the guest's SSH port 22.
    pub ssh_port: Option<u16>,
    /// (host port on 127.0.0.1, guest port), TCP.
    pub forwards: Vec<(u16, u16)>,
    pub serial: SerialTarget,
    pub accel: Accel,
    /// Present the disk as this many bytes (a provider's bigger disk) through a
    /// throw-away qcow2 overlay; the image itself is not touched.
    pub disk_size: Option<u64>,
    /// Cut the user-mode NIC off from the host and everything beyond it: only the
    /// forwards above and `guest_forwards` below still pass (a drill's "no route to
    /// production").
    pub restrict: bool,
    /// TCP connections the guest makes to (guest-side address, port) are carried to
    /// this port on the host's 127.0.0.1: the one door a restricted guest has.
    pub guest_forwards: Vec<(std::net::Ipv4Addr, u16, u16)>,
    /// Like `guest_forwards`, but each guest connection gets its own run of `command`
    /// (its stdin/stdout are the connection). The chardev of `guest_forwards` carries
    /// a single connection: a guest that opens several at once (parallel HTTP) needs this.
    pub guest_forward_cmds: Vec<(std::net::Ipv4Addr, u16, String)>,
    /// Where the user-mode network puts its own host alias (default 10.0.2.2). libslirp
    /// refuses a guest forward on that alias, so a restricted guest that must reach a
    /// server on the host's 127.0.0.1 *as* 10.0.2.2 moves it (e.g. to 10.0.2.254).
    pub host_address: Option<std::net::Ipv4Addr>,
    /// Second NICs joined to other guests by UDP datagrams between ports on 127.0.0.1
    /// (a private LAN between two staging hosts, nothing else on it).
    pub lans: Vec<LanNic>,
    /// systemd credentials handed to the guest through SMBIOS type 11; units read them
    /// with `ImportCredential=`.
    pub credentials: Vec<(String, Vec<u8>)>,
}

/// One end of a point-to-point guest LAN.
#[derive(Debug, Clone)]
pub struct LanNic {
    /// MAC address; the guest's network config matches on it.
    pub mac: String,
    /// UDP port on 127.0.0.1 this guest's NIC receives on.
    pub local_port: u16,
    /// UDP port on 127.0.0.1 of the other guest's NIC.
    pub remote_port: u16,
}

impl RunOptions {
    pub fn new(image: impl Into<PathBuf>) -> RunOptions {
        RunOptions {
            image: image.into(),
            memory_mib: 2048,
            cpus: 2,
            persist: false,
            ssh_port: None,
            forwards: Vec::new(),
            serial: SerialTarget::Terminal,
            accel: Accel::Auto,
            disk_size: None,
            restrict: false,
            guest_forwards: Vec::new(),
            guest_forward_cmds: Vec::new(),
            host_address: None,
            lans: Vec::new(),
            credentials: Vec::new(),
        }
    }
}

/// A running guest. Dropping it kills QEMU and removes its scratch files.
pub struct Vm {
    child: Child,
    pub accel: Accel,
    pub started: Instant,
    _scratch: tempfile::TempDir,
}

impl Vm {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
    /// Some(status) once QEMU has exited.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>, ImageError> {
        self.child.try_wait().map_err(io_err("cannot poll qemu"))
    }
    pub fn wait(&mut self) -> Result<ExitStatus, ImageError> {
        self.child.wait().map_err(io_err("cannot wait for qemu"))
    }
    /// Presses the ACPI power button (what a provider's "shut down" does) and waits up
    /// to `timeout` for the guest to power off. Ok(false): still running.
    pub fn power_off(&mut self, timeout: std::time::Duration) -> Result<bool, ImageError> {
        use std::io::Write;
        let sock = self._scratch.path().join("monitor.sock");
        let mut m = std::os::unix::net::UnixStream::connect(&sock).map_err(io_err(format!(
            "cannot reach the QEMU monitor at {} (only a VM with a serial file has one)",
            sock.display()
        )))?;
        m.write_all(b"system_powerdown\n")
            .map_err(io_err("cannot write to the QEMU monitor"))?;
        let until = Instant::now() + timeout;
        while Instant::now() < until {
            if self.try_wait()?.is_some() {
                return Ok(true);
            }
            std::thread::sleep(std::time::Duration::from_millis(250));
        }
        Ok(false)
    }
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.kill();
    }
}

fn firmware() -> Result<(), ImageError> {
    for p in [OVMF_CODE, OVMF_VARS] {
        if !Path::new(p).is_file() {
            return Err(ImageError::ToolMissing {
                tool: format!("OVMF firmware ({p})"),
                hint: "sudo apt-get install ovmf (on Debian 12 add -t bookworm-backports)".into(),
            });
        }
    }
    Ok(())
}

/// True when a tiny guest really runs under KVM for a couple of seconds.
pub fn kvm_works() -> bool {
    if fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        return false;
    }
    let Ok(qemu) = QEMU_SYSTEM.find() else {
        return false;
    };
    let Ok(dir) = tempfile::tempdir() else {
        return false;
    };
    let vars = dir.path().join("vars.fd");
    if fs::copy(OVMF_VARS, &vars).is_err() {
        return false;
    }
    // The firmware alone is a real guest. A broken KVM does not make QEMU exit: it
    // prints "KVM internal error ... emulation failure" and pauses the guest, so the
    // probe watches stderr as well as the process.
    let err_path = dir.path().join("stderr");
    let Ok(err_file) = fs::File::create(&err_path) else {
        return false;
    };
    let child = Command::new(qemu)
        .args(["-machine", "q35,accel=kvm", "-cpu", "host", "-m", "128"])
        .args([
            "-nodefaults",
            "-display",
            "none",
            "-serial",
            "none",
            "-monitor",
            "none",
        ])
        .arg("-drive")
        .arg(format!(
            "if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}"
        ))
        .arg("-drive")
        .arg(format!(
            "if=pflash,format=raw,unit=1,file={}",
            vars.display()
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(err_file)
        .spawn();
    let Ok(mut child) = child else {
        return false;
    };
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut ok = true;
    while Instant::now() < deadline {
        let complained = fs::metadata(&err_path).map(|m| m.len() > 0).unwrap_or(true);
        if complained || !matches!(child.try_wait(), Ok(None)) {
            ok = false;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
    ok
}

fn image_format(p: &Path) -> Result<&'static str, ImageError> {
    let mut magic = [0u8; 4];
    use std::io::Read;
    fs::File::open(p)
        .and_then(|mut f| f.read_exact(&mut magic))
        .map_err(io_err(format!("cannot read {}", p.display())))?;
    Ok(if &magic == b"QFI\xfb" { "qcow2" } else { "raw" })
}

/// Starts QEMU and returns at once; the caller waits, watches the serial file, kills.
pub fn start(opts: &RunOptions) -> Result<Vm, ImageError> {
    let qemu = QEMU_SYSTEM.find()?;
    firmware()?;
    let image = fs::canonicalize(&opts.image).map_err(io_err(format!(
        "cannot find image {}",
        opts.image.display()
    )))?;
    let fmt = image_format(&image)?;
    let scratch = tempfile::Builder::new()
        .prefix("imgbuild-vm-")
        .tempdir()
        .map_err(io_err("cannot create VM scratch dir"))?;
    let vars = scratch.path().join("OVMF_VARS.fd");
    fs::copy(OVMF_VARS, &vars).map_err(io_err("cannot copy OVMF_VARS"))?;

    let mut drive = if let Some(size) = opts.disk_size {
        let overlay = scratch.path().join("disk.qcow2");
        tools::run_captured(
            Command::new(QEMU_IMG.find()?)
                .args(["create", "-q", "-f", "qcow2", "-F", fmt, "-b"])
                .arg(&image)
                .arg(&overlay)
                .arg(size.to_string()),
            "qemu-img create (overlay)",
        )?;
        format!("file={},format=qcow2,if=virtio", overlay.display())
    } else {
        let mut d = format!("file={},format={fmt},if=virtio", image.display());
        if !opts.persist {
            d.push_str(",snapshot=on");
        }
        d
    };
    drive.push_str(",cache=unsafe");

    let accel = match opts.accel {
        Accel::Auto if kvm_works() => Accel::Kvm,
        Accel::Auto => Accel::Tcg,
        a => a,
    };
    let mut nic = "user,model=virtio-net-pci".to_string();
    if let Some(a) = opts.host_address {
        nic.push_str(&format!(",net=10.0.2.0/24,host={a}"));
    }
    let fwd = opts
        .ssh_port
        .map(|p| (p, 22))
        .into_iter()
        .chain(opts.forwards.iter().copied());
    for (host, guest) in fwd {
        nic.push_str(&format!(",hostfwd=tcp:127.0.0.1:{host}-:{guest}"));
    }
    if opts.restrict {
        nic.push_str(",restrict=on");
    }
    for (addr, port, host) in &opts.guest_forwards {
        nic.push_str(&format!(",guestfwd=tcp:{addr}:{port}-tcp:127.0.0.1:{host}"));
    }
    for (addr, port, command) in &opts.guest_forward_cmds {
        // QEMU's option syntax escapes a comma by doubling it.
        let command = command.replace(',', ",,");
        nic.push_str(&format!(",guestfwd=tcp:{addr}:{port}-cmd:{command}"));
    }
    let mut cmd = Command::new(qemu);
    match accel {
        Accel::Kvm => cmd.args(["-machine", "q35,accel=kvm", "-cpu", "host"]),
        _ => cmd.args(["-machine", "q35,accel=tcg", "-cpu", "max"]),
    };
    cmd.arg("-m")
        .arg(opts.memory_mib.to_string())
        .arg("-smp")
        .arg(opts.cpus.to_string())
        .args(["-nodefaults", "-no-user-config", "-display", "none"])
        .arg("-drive")
        .arg(format!(
            "if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}"
        ))
        .arg("-drive")
        .arg(format!(
            "if=pflash,format=raw,unit=1,file={}",
            vars.display()
        ))
        .arg("-drive")
        .arg(drive)
        .arg("-nic")
        .arg(nic)
        .args(["-device", "virtio-rng-pci"]);
    for (i, lan) in opts.lans.iter().enumerate() {
        cmd.arg("-netdev").arg(format!(
            "dgram,id=lan{i},local.type=inet,local.host=127.0.0.1,local.port={},\
             remote.type=inet,remote.host=127.0.0.1,remote.port={}",
            lan.local_port, lan.remote_port
        ));
        cmd.arg("-device")
            .arg(format!("virtio-net-pci,netdev=lan{i},mac={}", lan.mac));
    }
    for (name, value) in &opts.credentials {
        use base64::Engine;
        let v = base64::engine::general_purpose::STANDARD.encode(value);
        cmd.arg("-smbios").arg(format!(
            "type=11,value=io.systemd.credential.binary:{name}={v}"
        ));
    }
    match &opts.serial {
        SerialTarget::Terminal => {
            cmd.args(["-serial", "mon:stdio"]);
        }
        SerialTarget::File(p) => {
            // The human monitor on a socket of the VM's own (0700 scratch directory):
            // how a caller presses the ACPI power button.
            cmd.arg("-serial")
                .arg(format!("file:{}", p.display()))
                .arg("-monitor")
                .arg(format!(
                    "unix:{},server=on,wait=off",
                    scratch.path().join("monitor.sock").display()
                ))
                .stdin(Stdio::null());
        }
    }
    let child = cmd.spawn().map_err(io_err("cannot start qemu"))?;
    Ok(Vm {
        child,
        accel,
        started: Instant::now(),
        _scratch: scratch,
    })
}

/// `imgbuild run IMAGE`: boots with the serial console on this terminal until the guest
/// powers off or the user quits QEMU (Ctrl-A X). Returns QEMU's exit code.
pub fn run(opts: &RunOptions) -> Result<i32, ImageError> {
    let mut vm = start(opts)?;
    let st = vm.wait()?;
    Ok(st.code().unwrap_or(1))
}

/// Reads a serial log until `pattern` appears, QEMU exits, or the timeout passes.
/// Returns the log so far and whether the pattern was seen.
pub fn wait_for_serial(
    vm: &mut Vm,
    log: &Path,
    pattern: &str,
    timeout: Duration,
) -> Result<(bool, String), ImageError> {
    let deadline = Instant::now() + timeout;
    loop {
        let text = fs::read(log)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        if text.contains(pattern) {
            return Ok((true, text));
        }
        if Instant::now() >= deadline {
            return Ok((false, text));
        }
        if let Some(st) = vm.try_wait()? {
            return Err(ImageError::Qemu(format!(
                "qemu exited ({st}) before {pattern:?} appeared:\n{}",
                tools::tail(&text, 40)
            )));
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}
