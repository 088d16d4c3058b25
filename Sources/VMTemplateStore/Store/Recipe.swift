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
    /// How a clone's guest clock and hostname are set when it starts.
    public var guestClock: GuestClock

    public init(kernel: String, initrd: String?, append: String, memory: String = "256M", cpus: Int = 1, machine: String = "q35", machineOptions: [String] = [], cpuModel: String? = nil, readyMarker: String = "VMTEMPLATE-READY", readyTimeoutSeconds: Double = 120, vmgenid: Bool = true, hotplugSlots: Int = 4, guestClock: GuestClock = .none) {
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
        case guestClock = "guest_clock"
    }

    public init(from decoder: any Decoder) throws {
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
        guestClock = try c.decodeIfPresent(GuestClock.self, forKey: .guestClock) ?? .none
    }

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
        let directory = URL(fileURLWithPath: path).deletingLastPathComponent()
        func absolute(_ file: String) -> String {
            file.hasPrefix("/") ? file : directory.appendingPathComponent(file).standardizedFileURL.path
        }
        recipe.kernel = absolute(recipe.kernel)
        recipe.initrd = recipe.initrd.map(absolute)
        return recipe
    }
}

/// How a clone's guest learns the time and its hostname when it starts: a restored guest's clock
/// stands where the template's stood when it was paused, minutes or days ago.
public enum GuestClock: String, Sendable, Codable, CaseIterable {
    /// `settime EPOCH` and `hostname NAME` on the control channel right after `cont`, delivered
    /// without waiting for the guest's answers (``GuestSetup``) (the built-in busybox guest).
    case controlChannel = "control-channel"
    /// Nothing: the guest keeps the template's time until something in it sets the clock.
    case none
}
