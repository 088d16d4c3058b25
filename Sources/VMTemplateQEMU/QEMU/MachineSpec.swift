import Foundation
import VMTemplateOS
/// Everything needed to rebuild a machine identical to the template's: device state only loads
/// into a machine with the same versioned type, the same machine options, the same devices in the
/// same order, and the same memory size. Stored in the manifest; clones render from it.
public struct MachineSpec: Sendable, Codable, Equatable {
    /// Versioned machine type, e.g. `pc-q35-10.0` (never an alias like `q35`).
    public var machineType: String
    /// Extra machine properties, in order, e.g. `["sata=off", "smbus=off"]`.
    public var machineOptions: [String]
    /// `-cpu` model, or nil for QEMU's default for the accelerator.
    public var cpuModel: String?
    public var cpus: Int
    public var memoryBytes: UInt64
    public var accelerator: Accelerator
    /// Whether the machine has a `vmgenid` device, so each clone can get a fresh generation ID.
    public var vmgenid: Bool
    /// Empty PCIe root ports (`pcie-root-port`) for devices hot-plugged into clones; 0 in
    /// manifests from before they existed. Template and clone must have the same number.
    public var hotplugSlots: Int
    /// The most root ports a machine gets (bounded so that a manifest cannot ask for thousands).
    public static let maxHotplugSlots = 32
    /// Disks the guest boots with (a recipe's `disks`), at fixed addresses in the template and in
    /// every clone; empty in manifests from before they existed.
    public var bootDisks: [BootDisk]
    /// A virtio-serial port named `org.qemu.guest_agent.0` for the guest's `qemu-guest-agent`,
    /// served by QEMU on ``InstancePaths/agentSocket``.
    public var guestAgent: Bool
    /// The most boot disks a machine gets.
    public static let maxBootDisks = 4
    /// With boot disks or an agent port, fewer root ports: QEMU gives the root ports the first
    /// free slots of the root bus, and these devices have fixed ones from ``BootDisk/firstSlot``.
    public static let maxHotplugSlotsWithFixedDevices = 16

    /// The root ports devices can be hot-plugged into: `hotplug0`, `hotplug1`, ...
    public var hotplugBuses: [String] { (0..<max(0, min(hotplugSlots, Self.maxHotplugSlots))).map { "hotplug\($0)" } }

    public init(machineType: String, machineOptions: [String], cpuModel: String?, cpus: Int, memoryBytes: UInt64, accelerator: Accelerator, vmgenid: Bool, hotplugSlots: Int = 0, bootDisks: [BootDisk] = [], guestAgent: Bool = false) {
        self.hotplugSlots = hotplugSlots
        self.bootDisks = bootDisks
        self.guestAgent = guestAgent
        self.machineType = machineType
        self.machineOptions = machineOptions
        self.cpuModel = cpuModel
        self.cpus = cpus
        self.memoryBytes = memoryBytes
        self.accelerator = accelerator
        self.vmgenid = vmgenid
    }

    enum CodingKeys: String, CodingKey {
        case machineType = "machine_type"
        case machineOptions = "machine_options"
        case cpuModel = "cpu_model"
        case cpus
        case memoryBytes = "memory_bytes"
        case accelerator
        case vmgenid
        case hotplugSlots = "hotplug_slots"
        case bootDisks = "boot_disks"
        case guestAgent = "guest_agent"
    }

    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        machineType = try c.decode(String.self, forKey: .machineType)
        machineOptions = try c.decode([String].self, forKey: .machineOptions)
        cpuModel = try c.decodeIfPresent(String.self, forKey: .cpuModel)
        cpus = try c.decode(Int.self, forKey: .cpus)
        memoryBytes = try c.decode(UInt64.self, forKey: .memoryBytes)
        accelerator = try c.decode(Accelerator.self, forKey: .accelerator)
        vmgenid = try c.decode(Bool.self, forKey: .vmgenid)
        hotplugSlots = try c.decodeIfPresent(Int.self, forKey: .hotplugSlots) ?? 0
        bootDisks = try c.decodeIfPresent([BootDisk].self, forKey: .bootDisks) ?? []
        guestAgent = try c.decodeIfPresent(Bool.self, forKey: .guestAgent) ?? false
        guard bootDisks.count <= Self.maxBootDisks else {
            throw DecodingError.dataCorruptedError(forKey: .bootDisks, in: c, debugDescription: "more than \(Self.maxBootDisks) boot disks")
        }
    }

    /// Old manifests are written back as they were read: the new keys only when they say something.
    public func encode(to encoder: any Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encode(machineType, forKey: .machineType)
        try c.encode(machineOptions, forKey: .machineOptions)
        try c.encodeIfPresent(cpuModel, forKey: .cpuModel)
        try c.encode(cpus, forKey: .cpus)
        try c.encode(memoryBytes, forKey: .memoryBytes)
        try c.encode(accelerator, forKey: .accelerator)
        try c.encode(vmgenid, forKey: .vmgenid)
        try c.encode(hotplugSlots, forKey: .hotplugSlots)
        if !bootDisks.isEmpty { try c.encode(bootDisks, forKey: .bootDisks) }
        if guestAgent { try c.encode(guestAgent, forKey: .guestAgent) }
    }
}

/// A disk a template's guest boots with: the template keeps its own copy (digest-pinned), which
/// every clone sees exactly, read-only or through a private overlay.
public struct BootDisk: Sendable, Codable, Equatable {
    public enum Mode: String, Sendable, Codable, CaseIterable {
        /// The guest may not write it: the template's guest and every clone open it read-only.
        case readonly
        /// The template's guest writes its own copy while it boots (what it wrote is part of the
        /// template); each clone writes to a qcow2 overlay of its own over that copy.
        case overlay
    }

    public var format: DiskFormat
    public var mode: Mode

    public init(format: DiskFormat, mode: Mode) {
        self.format = format
        self.mode = mode
    }

    /// The root bus slot of the first boot disk; the agent's virtio-serial controller has the one
    /// before it.
    public static let firstSlot = 0x18
    public static let agentSlot = 0x17

    /// The device's QEMU ID (and its top block node's name) for the disk at `index`.
    public static func deviceID(_ index: Int) -> String { "bootdisk\(index)" }
}

/// Kernel boot of a template VM. Clones restore from saved state and need none of it, which also
/// keeps QEMU from holding a copy of the kernel blob in each clone's memory.
package struct KernelBoot: Sendable, Equatable {
    public var kernel: String
    public var initrd: String?
    public var append: String

    public init(kernel: String, initrd: String?, append: String) {
        self.kernel = kernel
        self.initrd = initrd
        self.append = append
    }
}

/// The files through which vmtemplate talks to one running QEMU.
public struct InstancePaths: Sendable, Equatable, Codable {
    public var qmpSocket: String
    /// The first serial port (kernel console, ready marker), written to a file.
    public var serialLog: String
    /// The second serial port, served by QEMU as a Unix socket: the guest's control channel.
    public var controlSocket: String
    /// QEMU's own stdout and stderr.
    public var qemuLog: String
    /// The guest agent's port, served by QEMU as a Unix socket (machines with ``MachineSpec/guestAgent``).
    public var agentSocket: String { FileSystem.split(qmpSocket).directory + "/agent.sock" }
    /// A clone's own qcow2 overlay over its template's boot disk `index` (an `overlay` disk).
    public func bootDiskOverlay(_ index: Int) -> String { FileSystem.split(qmpSocket).directory + "/\(BootDisk.deviceID(index)).qcow2" }

    public init(directory: String) {
        qmpSocket = "\(directory)/qmp.sock"
        serialLog = "\(directory)/serial.log"
        controlSocket = "\(directory)/control.sock"
        qemuLog = "\(directory)/qemu.log"
    }

    enum CodingKeys: String, CodingKey {
        case qmpSocket = "qmp_socket"
        case serialLog = "serial_log"
        case controlSocket = "control_socket"
        case qemuLog = "qemu_log"
    }

    /// Unix socket paths are limited by `sun_path` (107 bytes on Linux): QEMU would fail with a
    /// vague error.
    public func checkSocketLengths() throws {
        for path in [qmpSocket, controlSocket, agentSocket] where path.utf8.count > UnixSocketAddress.maxPathBytes {
            throw VMTemplateError(.invalidArgument, "socket path '\(path)' is \(path.utf8.count) bytes, over the \(UnixSocketAddress.maxPathBytes) allowed for Unix sockets: use a store with a shorter path (--store).")
        }
    }
}

/// Where QEMU's QMP monitor listens.
public enum QMPEndpoint: Sendable, Equatable {
    /// On a socket vmtemplate bound beforehand and passes as fd 3 (``QMPListener``): the spawner
    /// must pass the listener to ``QEMUInstance/launch(arguments:name:paths:qmp:executable:transparentHugePages:)`` (it binds the listener itself).
    case inheritedListener
    /// On `InstancePaths.qmpSocket`, bound by QEMU itself (what other tools, e.g. Kata, do).
    case socketPath
}

/// What QEMU may do once it runs.
package struct QEMUConfinement: Sendable, Equatable {
    /// QEMU's seccomp filter (`-sandbox on`) with obsolete calls, privilege elevation and
    /// resource control denied; `spawn` denied too unless the migration pipes through a shell.
    public var sandbox: Bool
    /// Deny fork/exec (incompatible with `exec:` migration URIs).
    public var denySpawn: Bool
    /// Drop to this user (`-run-with user=`) once QEMU has opened its files and sockets.
    public var user: String?

    public init(sandbox: Bool, denySpawn: Bool, user: String?) {
        self.sandbox = sandbox
        self.denySpawn = denySpawn
        self.user = user
    }

    /// The system user `scripts/setup` creates for QEMU to run as.
    public static let systemUser = "vmtemplate-qemu"
    /// `off` turns confinement off, `no-user` keeps the sandbox but not the user drop (for
    /// measuring what each costs, or debugging QEMU).
    public static let environmentVariable = "VMTEMPLATE_QEMU_SANDBOX"

    /// What a QEMU started by this process gets: the sandbox always; as root also the drop to
    /// ``systemUser`` when it exists and `userMayRead` (QEMU reads the files it opens after the
    /// drop, such as a clone's device state, as that user). An unprivileged QEMU has no user to
    /// drop to, and its sandbox denies privilege elevation (libseccomp sets no_new_privs, which an
    /// unprivileged process needs to install a filter). `VMTEMPLATE_QEMU_SANDBOX=off` turns it off.
    public static func forThisProcess(version: QEMUVersion, userMayRead: Bool, denySpawn: Bool, environment: [String: String] = ProcessInfo.processInfo.environment) -> QEMUConfinement? {
        let setting = environment[environmentVariable]
        // -sandbox with these sub-options: QEMU >= 2.11; -run-with user=: QEMU >= 9.1.
        guard setting != "off", version >= QEMUVersion(2, 11) else { return nil }
        let user = geteuid() == 0 && userMayRead && setting != "no-user" && version >= QEMUVersion(9, 1) && getpwnam(systemUser) != nil ? systemUser : nil
        return QEMUConfinement(sandbox: true, denySpawn: denySpawn, user: user)
    }

    func arguments() -> [String] {
        var arguments: [String] = []
        if sandbox {
            // QEMU installs the filter while it parses its options, before it drops to `user`,
            // so the drop's setgroups/setgid/setuid must be allowed when there is one. After the
            // drop no capability is left, so set*id can no longer raise privileges anyway.
            let elevate = user == nil ? "deny" : "allow"
            arguments += ["-sandbox", "on,obsolete=deny,elevateprivileges=\(elevate),spawn=\(denySpawn ? "deny" : "allow"),resourcecontrol=deny"]
        }
        if let user {
            arguments += ["-run-with", "user=" + QEMUOptionString.escape(user)]
        }
        return arguments
    }
}

extension QEMUCommandLine {
    /// Boot disks and the guest agent's port, at the fixed slots the template's device state
    /// expects (``BootDisk/firstSlot``, ``BootDisk/agentSlot``).
    func fixedDeviceArguments() throws -> [String] {
        let disks = machine.bootDisks
        guard disks.count <= MachineSpec.maxBootDisks, bootDisks.count == disks.count else {
            throw VMTemplateError(.invalidState, "the machine has \(disks.count) boot disks but \(bootDisks.count) were given files: the template's manifest is damaged; create it again.")
        }
        guard disks.isEmpty && !machine.guestAgent || machine.hotplugSlots <= MachineSpec.maxHotplugSlotsWithFixedDevices else {
            throw VMTemplateError(.invalidArgument, "hotplug_slots \(machine.hotplugSlots) leaves no room for boot disks and the guest agent: give at most \(MachineSpec.maxHotplugSlotsWithFixedDevices).")
        }
        var arguments: [String] = []
        for (index, (disk, files)) in zip(disks, bootDisks).enumerated() {
            let id = BootDisk.deviceID(index)
            let imageNode = "\(id)-image"
            arguments += try Self.blockdev(["driver": "file", "node-name": "\(imageNode)-file", "filename": files.image, "read-only": !files.imageWritable])
            var image: [String: Any] = ["driver": disk.format.rawValue, "node-name": imageNode, "file": "\(imageNode)-file", "read-only": !files.imageWritable]
            // A qcow2 image's own backing file is never followed: its name is in the image.
            if disk.format == .qcow2 { image["backing"] = NSNull() }
            arguments += try Self.blockdev(image)
            var top = imageNode
            if let overlay = files.overlay {
                arguments += try Self.blockdev(["driver": "file", "node-name": "\(id)-overlay-file", "filename": overlay])
                arguments += try Self.blockdev(["driver": "qcow2", "node-name": id, "file": "\(id)-overlay-file", "backing": imageNode])
                top = id
            }
            arguments += ["-device", QEMUOptionString.render(type: "virtio-blk-pci", [("id", id), ("drive", top), ("bus", "pcie.0"), ("addr", "0x" + String(BootDisk.firstSlot + index, radix: 16))])]
        }
        if machine.guestAgent {
            arguments += [
                "-device", QEMUOptionString.render(type: "virtio-serial-pci", [("id", "agent-serial"), ("bus", "pcie.0"), ("addr", "0x" + String(BootDisk.agentSlot, radix: 16))]),
                "-chardev", QEMUOptionString.render(type: "socket", [("id", "agent"), ("path", paths.agentSocket), ("server", "on"), ("wait", "off")]),
                "-device", QEMUOptionString.render(type: "virtserialport", [("id", "agent-port"), ("bus", "agent-serial.0"), ("chardev", "agent"), ("name", "org.qemu.guest_agent.0")]),
            ]
        }
        return arguments
    }

    /// `-blockdev` in QEMU's JSON form: the only one that can say `backing: null`, and one in which
    /// no file name can be mistaken for another option.
    static func blockdev(_ options: [String: Any]) throws -> [String] {
        let data = try JSONSerialization.data(withJSONObject: options, options: [.sortedKeys, .withoutEscapingSlashes])
        return ["-blockdev", String(decoding: data, as: UTF8.self)]
    }
}

/// Where one boot disk's bytes are, for one QEMU.
package struct BootDiskFiles: Sendable, Equatable {
    /// The template's copy of the disk.
    public var image: String
    /// Whether QEMU may write the image: only the template's own guest, of an `overlay` disk.
    public var imageWritable: Bool
    /// A clone's own qcow2 overlay over the image (an `overlay` disk), nil for none.
    public var overlay: String?

    public init(image: String, imageWritable: Bool, overlay: String?) {
        self.image = image
        self.imageWritable = imageWritable
        self.overlay = overlay
    }
}

/// How a QEMU instance starts.
package enum LaunchMode: Sendable, Equatable {
    /// Boot the kernel (the template VM).
    case boot(KernelBoot)
    /// Wait paused for `migrate-incoming` (a clone).
    case incoming
    /// A clone's machine, stopped before it runs (`-S`) and loading nothing: QEMU's own start-up,
    /// the floor the benchmark measures a clone against.
    case paused
}

/// The whole QEMU command line, as a value; `arguments` renders it.
package struct QEMUCommandLine: Sendable, Equatable {
    public var name: String
    public var machine: MachineSpec
    public var memory: MemoryBackendFile
    public var paths: InstancePaths
    public var launch: LaunchMode
    /// The generation ID to give the `vmgenid` device (`auto` lets QEMU pick a fresh one).
    public var vmgenidGUID: String
    /// TCG translation cache size in MiB, nil for QEMU's default.
    public var tcgTranslationCacheMiB: Int?

    public var qmp: QMPEndpoint
    /// Seccomp and an unprivileged user, for a QEMU started as root; nil: neither.
    public var confinement: QEMUConfinement?
    /// The files of the machine's boot disks, one per ``MachineSpec/bootDisks`` entry.
    public var bootDisks: [BootDiskFiles]

    public init(name: String, machine: MachineSpec, memory: MemoryBackendFile, paths: InstancePaths, launch: LaunchMode, vmgenidGUID: String = "auto", tcgTranslationCacheMiB: Int? = nil, qmp: QMPEndpoint = .inheritedListener, confinement: QEMUConfinement? = nil, bootDisks: [BootDiskFiles] = []) {
        self.qmp = qmp
        self.bootDisks = bootDisks
        self.confinement = confinement
        self.name = name
        self.machine = machine
        self.memory = memory
        self.paths = paths
        self.launch = launch
        self.vmgenidGUID = vmgenidGUID
        self.tcgTranslationCacheMiB = tcgTranslationCacheMiB
    }

    public func arguments() throws -> [String] {
        var machineProperties: [(String, String)] = [("memory-backend", memory.id)]
        for option in machine.machineOptions {
            let pair = option.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false).map(String.init)
            // A property name is QEMU's own word: nothing that could start another property.
            guard let key = pair.first, !key.isEmpty, key.utf8.allSatisfy({ ($0 >= 0x61 && $0 <= 0x7a) || ($0 >= 0x30 && $0 <= 0x39) || $0 == 0x2d || $0 == 0x5f || $0 == 0x2e }) else {
                throw VMTemplateError(.invalidArgument, "machine option '\(TerminalText.escape(option))' is not NAME or NAME=VALUE with a lower-case NAME (e.g. smbus=off): fix the recipe's machine_options.")
            }
            machineProperties.append((key, pair.count > 1 ? pair[1] : "on"))
        }
        var arguments = [
            "-name", QEMUOptionString.render(type: name, []),
            // Only the devices named below: anything QEMU adds by default would have to match
            // between template and clone, and costs memory in every clone.
            "-nodefaults", "-no-user-config",
            "-display", "none",
            "-machine", QEMUOptionString.render(type: machine.machineType, machineProperties),
            "-accel", machine.accelerator.accelArgument(tcgTranslationCacheMiB: tcgTranslationCacheMiB),
        ]
        if let cpuModel = machine.cpuModel { arguments += ["-cpu", cpuModel] }
        arguments += [
            "-smp", String(machine.cpus),
            "-m", "\(machine.memoryBytes / (1024 * 1024))M",
            "-object", try memory.objectArgument(),
            "-chardev", QEMUOptionString.render(type: "file", [("id", "console"), ("path", paths.serialLog)]),
            "-serial", "chardev:console",
            // wait=off: the guest must run whether or not anybody is connected to its channel.
            "-chardev", QEMUOptionString.render(type: "socket", [("id", "control"), ("path", paths.controlSocket), ("server", "on"), ("wait", "off")]),
            "-serial", "chardev:control",
        ]
        switch qmp {
        case .inheritedListener:
            arguments += [
                "-chardev", QEMUOptionString.render(type: "socket", [("id", "qmp"), ("fd", String(QMPListener.inheritedDescriptor)), ("server", "on"), ("wait", "off")]),
                "-mon", "chardev=qmp,mode=control",
            ]
        case .socketPath:
            arguments += ["-qmp", "unix:\(QEMUOptionString.escape(paths.qmpSocket)),server=on,wait=off"]
        }
        // Root ports for hot-plug: chassis numbers from 1, addresses left to QEMU, which assigns
        // them in order, the same in the template and every clone.
        for (slot, bus) in machine.hotplugBuses.enumerated() {
            arguments += ["-device", QEMUOptionString.render(type: "pcie-root-port", [("id", bus), ("chassis", String(slot + 1))])]
        }
        if machine.vmgenid {
            arguments += ["-device", QEMUOptionString.render(type: "vmgenid", [("id", "vmgenid0"), ("guid", vmgenidGUID)])]
        }
        arguments += try fixedDeviceArguments()
        if let confinement { arguments += confinement.arguments() }
        switch launch {
        case .boot(let boot):
            arguments += ["-kernel", boot.kernel]
            if let initrd = boot.initrd { arguments += ["-initrd", initrd] }
            arguments += ["-append", boot.append]
        case .incoming:
            arguments += ["-incoming", "defer"]
        case .paused:
            arguments += ["-S"]
        }
        return arguments
    }
}
