import VMTemplateOS
import VMTemplateQEMU
import Foundation

/// How to build a template: the guest, its machine, and how to tell it is ready.
/// Read from a JSON file such as `templates/busybox/template.json`; paths are relative to that file.
public struct Recipe: Sendable, Codable, Equatable {
    public var kernel: String
    public var initrd: String?
    public var append: String
    /// Guest memory, e.g. `256M`.
    public var memory: String
    public var cpus: Int
    /// A machine type or alias (`q35`); resolved to its versioned name at create time.
    public var machine: String
    public var machineOptions: [String]
    public var cpuModel: String?
    /// Text the guest prints on its first serial port once it is ready to be paused.
    public var readyMarker: String
    public var readyTimeoutSeconds: Double
    public var vmgenid: Bool
    /// Empty PCIe root ports for devices hot-plugged into clones (q35 only).
    public var hotplugSlots: Int
    /// How a clone's guest clock and hostname are set when it starts (`guest_setup`).
    public var guestClock: GuestClock
    /// When the guest is ready to be paused: its serial marker, or its guest agent answering.
    public var readyWhen: ReadyCondition
    /// Commands run through the guest agent, in order, once it answers at create time; each must
    /// exit 0 (e.g. `systemctl is-system-running --wait`: the guest is quiet before it is paused).
    public var readyCommands: [[String]]
    /// Commands each clone's guest agent runs, in order, after its clock and hostname
    /// (``GuestCommand`` placeholders: `{hostname}`, `{id}`).
    public var guestCommands: [[String]]
    /// Disks the guest boots with.
    public var disks: [RecipeDisk]

    public init(kernel: String, initrd: String?, append: String, memory: String = "256M", cpus: Int = 1, machine: String = "q35", machineOptions: [String] = [], cpuModel: String? = nil, readyMarker: String = "VMTEMPLATE-READY", readyTimeoutSeconds: Double = 120, vmgenid: Bool = true, hotplugSlots: Int = 4, guestClock: GuestClock = .none, readyWhen: ReadyCondition = .marker, readyCommands: [[String]] = [], guestCommands: [[String]] = [], disks: [RecipeDisk] = []) {
        self.readyWhen = readyWhen
        self.readyCommands = readyCommands
        self.guestCommands = guestCommands
        self.disks = disks
        self.hotplugSlots = hotplugSlots
        self.guestClock = guestClock
        self.kernel = kernel
        self.initrd = initrd
        self.append = append
        self.memory = memory
        self.cpus = cpus
        self.machine = machine
        self.machineOptions = machineOptions
        self.cpuModel = cpuModel
        self.readyMarker = readyMarker
        self.readyTimeoutSeconds = readyTimeoutSeconds
        self.vmgenid = vmgenid
    }

    enum CodingKeys: String, CodingKey {
        case kernel, initrd, append, memory, cpus, machine
        case machineOptions = "machine_options"
        case cpuModel = "cpu_model"
        case readyMarker = "ready_marker"
        case readyTimeoutSeconds = "ready_timeout_seconds"
        case vmgenid
        case hotplugSlots = "hotplug_slots"
        case guestClock = "guest_setup"
        case readyWhen = "ready_when"
        case readyCommands = "ready_commands"
        case guestCommands = "guest_commands"
        case disks
    }

    /// The keys a recipe may have; `guest_clock` is the old name of `guest_setup`.
    static let knownKeys = ["kernel", "initrd", "append", "memory", "cpus", "machine", "machine_options", "cpu_model", "ready_marker", "ready_timeout_seconds", "vmgenid", "hotplug_slots", "guest_setup", "guest_clock", "ready_when", "ready_commands", "guest_commands", "disks"]
    private enum OldKeys: String, CodingKey { case guestClock = "guest_clock" }

    public init(from decoder: any Decoder) throws {
        // A misspelt key would be a setting silently not applied.
        try JSONCoding.refuseUnknownKeys(decoder, known: Self.knownKeys, in: "the recipe")
        let c = try decoder.container(keyedBy: CodingKeys.self)
        kernel = try c.decode(String.self, forKey: .kernel)
        initrd = try c.decodeIfPresent(String.self, forKey: .initrd)
        append = try c.decodeIfPresent(String.self, forKey: .append) ?? "console=ttyS0"
        memory = try c.decodeIfPresent(String.self, forKey: .memory) ?? "256M"
        cpus = try c.decodeIfPresent(Int.self, forKey: .cpus) ?? 1
        machine = try c.decodeIfPresent(String.self, forKey: .machine) ?? "q35"
        machineOptions = try c.decodeIfPresent([String].self, forKey: .machineOptions) ?? []
        cpuModel = try c.decodeIfPresent(String.self, forKey: .cpuModel)
        readyMarker = try c.decodeIfPresent(String.self, forKey: .readyMarker) ?? "VMTEMPLATE-READY"
        readyTimeoutSeconds = try c.decodeIfPresent(Double.self, forKey: .readyTimeoutSeconds) ?? 120
        vmgenid = try c.decodeIfPresent(Bool.self, forKey: .vmgenid) ?? true
        hotplugSlots = try c.decodeIfPresent(Int.self, forKey: .hotplugSlots) ?? 4
        guestClock = try c.decodeIfPresent(GuestClock.self, forKey: .guestClock)
            ?? decoder.container(keyedBy: OldKeys.self).decodeIfPresent(GuestClock.self, forKey: .guestClock) ?? .none
        readyWhen = try c.decodeIfPresent(ReadyCondition.self, forKey: .readyWhen) ?? .marker
        readyCommands = try c.decodeIfPresent([[String]].self, forKey: .readyCommands) ?? []
        guestCommands = try c.decodeIfPresent([[String]].self, forKey: .guestCommands) ?? []
        disks = try c.decodeIfPresent([RecipeDisk].self, forKey: .disks) ?? []
    }

    /// The checks a recipe's guest-agent settings must pass, each refusal naming the key.
    public func checkGuestAgentSettings() throws {
        if !readyCommands.isEmpty && readyWhen != .guestAgent {
            throw VMTemplateError(.invalidArgument, "ready_commands run through the guest agent: add \"ready_when\": \"guest-agent\" to the recipe, or remove them.")
        }
        if !guestCommands.isEmpty && guestClock != .guestAgent {
            throw VMTemplateError(.invalidArgument, "guest_commands run through the guest agent: add \"guest_setup\": \"guest-agent\" to the recipe, or remove them.")
        }
        try GuestCommand.check(readyCommands, key: "ready_commands")
        try GuestCommand.check(guestCommands, key: "guest_commands")
        guard disks.count <= MachineSpec.maxBootDisks else {
            throw VMTemplateError(.invalidArgument, "the recipe lists \(disks.count) disks: give at most \(MachineSpec.maxBootDisks).")
        }
    }

    /// Whether the template's machine has a guest agent port.
    public var needsGuestAgent: Bool { readyWhen == .guestAgent || guestClock == .guestAgent }

    /// Loads a recipe file and makes its relative paths absolute.
    public static func load(path: String) throws -> Recipe {
        guard let data = FileManager.default.contents(atPath: path) else {
            throw VMTemplateError(.notFound, "recipe '\(path)' does not exist or cannot be read: give the path of a template.json (e.g. templates/busybox/template.json).")
        }
        var recipe: Recipe
        do {
            recipe = try JSONDecoder().decode(Recipe.self, from: data)
        } catch {
            throw VMTemplateError(.invalidArgument, "recipe '\(path)' cannot be read: \(JSONErrorText.describe(error)); fix it, using templates/busybox/template.json as the model.")
        }
        // The recipe's own directory with its links resolved: the recipe's author chose it (the
        // caller named the file), and a disk below it is then found without following a link
        // (``DiskImage`` follows none, so that nobody can point root at another file).
        let directory = URL(fileURLWithPath: path).deletingLastPathComponent().resolvingSymlinksInPath()
        func absolute(_ file: String) -> String {
            file.hasPrefix("/") ? file : directory.appendingPathComponent(file).standardizedFileURL.path
        }
        recipe.kernel = absolute(recipe.kernel)
        recipe.initrd = recipe.initrd.map(absolute)
        for index in recipe.disks.indices { recipe.disks[index].path = absolute(recipe.disks[index].path) }
        return recipe
    }
}

/// How a clone's guest learns the time and its hostname when it starts: a restored guest's clock
/// stands where the template's stood when it was paused, minutes or days ago.
public enum GuestClock: String, Sendable, Codable, CaseIterable {
    /// `settime EPOCH` and `hostname NAME` on the control channel right after `cont`, delivered
    /// without waiting for the guest's answers (``GuestSetup``) (the built-in busybox guest).
    case controlChannel = "control-channel"
    /// `guest-set-time`, `hostname NAME` and the recipe's `guest_commands` through the guest's
    /// `qemu-guest-agent`, in order, by a helper that holds the agent's channel until they are done
    /// (``GuestAgentSetup``).
    case guestAgent = "guest-agent"
    /// Nothing: the guest keeps the template's time until something in it sets the clock.
    case none
}

/// When a template's guest is ready to be paused.
public enum ReadyCondition: String, Sendable, Codable, CaseIterable {
    /// It printed the recipe's `ready_marker` on its first serial port.
    case marker
    /// Its `qemu-guest-agent` answered `guest-sync-delimited`, and every `ready_commands` entry
    /// exited 0.
    case guestAgent = "guest-agent"
}

/// A disk of a recipe: `{"path": FILE, "format": "raw"|"qcow2", "mode": "readonly"|"overlay"}`.
public struct RecipeDisk: Sendable, Codable, Equatable {
    public var path: String
    public var format: DiskFormat
    public var mode: BootDisk.Mode

    public init(path: String, format: DiskFormat = .raw, mode: BootDisk.Mode = .overlay) {
        self.path = path
        self.format = format
        self.mode = mode
    }

    public init(from decoder: any Decoder) throws {
        try JSONCoding.refuseUnknownKeys(decoder, known: ["path", "format", "mode"], in: "a recipe's disk")
        let c = try decoder.container(keyedBy: CodingKeys.self)
        path = try c.decode(String.self, forKey: .path)
        format = try c.decodeIfPresent(DiskFormat.self, forKey: .format) ?? .raw
        mode = try c.decodeIfPresent(BootDisk.Mode.self, forKey: .mode) ?? .overlay
    }
}

/// A command a guest agent runs: argv, the program looked up in the guest's PATH. In
/// `guest_commands`, `{hostname}` and `{id}` stand for the clone's hostname and ID (both only
/// letters, digits, `.`, `_` and `-`, never first `-`: safe as an argument and inside a shell
/// command), and `{random}` for 64 hex digits of the host's randomness, fresh for each clone: every
/// clone resumes with its template's RNG state, and a guest kernel without `CONFIG_VMGENID` does not
/// reseed it (docs/guests.md).
public enum GuestCommand {
    public static let maxCommands = 16
    public static let maxArguments = 64
    public static let maxArgumentBytes = 4096

    /// All commands together, at most (they travel in a manifest and a helper's plan).
    public static let maxTotalBytes = 64 * 1024

    /// Bounds and printable text: a recipe's and a manifest's commands are checked alike.
    public static func check(_ commands: [[String]], key: String) throws {
        guard commands.joined().reduce(0, { $0 + $1.utf8.count }) <= maxTotalBytes else {
            throw VMTemplateError(.invalidArgument, "\(key) holds more than \(maxTotalBytes / 1024) KiB of arguments: put the work in a script in the guest.")
        }
        guard commands.count <= maxCommands else {
            throw VMTemplateError(.invalidArgument, "\(key) has \(commands.count) commands: give at most \(maxCommands) (put more in a script in the guest).")
        }
        for command in commands {
            guard !command.isEmpty, command.count <= maxArguments, !command[0].isEmpty else {
                throw VMTemplateError(.invalidArgument, "\(key) holds an empty command or one of more than \(maxArguments) arguments: give each as [\"program\", \"argument\", ...].")
            }
            for argument in command where argument.utf8.count > maxArgumentBytes || argument.utf8.contains(0) {
                throw VMTemplateError(.invalidArgument, "\(key) holds an argument of more than \(maxArgumentBytes) bytes or with a NUL ('\(TerminalText.escape(String(argument.prefix(40))))…'): shorten it.")
            }
        }
    }

    /// `command` with the placeholders filled in.
    public static func expand(_ command: [String], hostname: String, id: String, random: String) -> [String] {
        command.map { $0.replacingOccurrences(of: "{hostname}", with: hostname).replacingOccurrences(of: "{id}", with: id).replacingOccurrences(of: "{random}", with: random) }
    }
}
