import VMTemplateOS

/// A device hot-plugged into a clone, as its record keeps it (and `inspect` shows it).
///
/// The QEMU-side names are derived from `id` (``netdevID``, ``nodeName``): nothing QEMU is asked
/// to remove comes from anywhere but this ID, which is checked when a record is read.
public struct AttachedDevice: Sendable, Codable, Equatable {
    public enum Kind: String, Sendable, Codable {
        case nic
        case disk
    }

    /// `nic0`, `disk1`...: the QEMU device ID, and what `device rm` takes.
    public var id: String
    public var kind: Kind
    /// The root port it sits in (`hotplugN`).
    public var bus: String
    // NIC
    public var mac: MACAddress?
    /// `tap` or `user`.
    public var backend: String?
    public var tap: String?
    public var netns: String?
    /// The tap was made for this clone and disappears with its QEMU.
    public var tapCreated: Bool?
    public var hostForwards: [String]?
    // Disk
    public var path: String?
    public var format: DiskFormat?
    public var readOnly: Bool?
    /// The clone writes to its own overlay, `CLONE_DIRECTORY/ID.qcow2` (``overlayFileName``).
    public var overlay: Bool?
    /// The virtio serial the guest sees (`/sys/block/vdX/serial`), naming the clone.
    public var serial: String?
    /// The fd sets QEMU holds the disk's descriptors in, released when the disk is removed.
    public var fdsets: [Int]?
    /// The tap or image was handed over as a descriptor (`fd=`), opened by the caller: a NIC's
    /// `tap` is then what the kernel says it is attached to, and a disk has no `path`.
    public var fromFD: Bool?

    enum CodingKeys: String, CodingKey {
        case id, kind, bus, mac, backend, tap, netns, path, format, overlay, serial, fdsets
        case tapCreated = "tap_created"
        case hostForwards = "hostfwd"
        case readOnly = "readonly"
        case fromFD = "from_fd"
    }

    public init(id: String, kind: Kind, bus: String) {
        self.id = id
        self.kind = kind
        self.bus = bus
    }

    public var netdevID: String { "netdev-\(id)" }
    public var nodeName: String { "node-\(id)" }
    public var overlayFileName: String { "\(id).qcow2" }

    /// Whether `id` is one vmtemplate would give: `nic` or `disk` and a number below 1000.
    public static func isValidID(_ id: String) -> Bool {
        for prefix in ["nic", "disk"] where id.hasPrefix(prefix) {
            let number = id.dropFirst(prefix.count)
            return !number.isEmpty && number.count <= 3 && number.allSatisfy(\.isASCII) && number.allSatisfy(\.isNumber)
        }
        return false
    }

    /// Whether `bus` is a hot-plug root port name (`hotplug0` to `hotplug31`).
    public static func isValidBus(_ bus: String) -> Bool {
        guard bus.hasPrefix("hotplug"), let slot = Int(bus.dropFirst("hotplug".count)) else { return false }
        return (0..<MachineSpec.maxHotplugSlots).contains(slot) && bus == "hotplug\(slot)"
    }

    /// Why a record's device cannot be believed, or nil.
    public var problem: String? {
        guard Self.isValidID(id), id.hasPrefix(kind.rawValue) else { return "device ID '\(TerminalText.escape(id))' is not one vmtemplate gives" }
        guard Self.isValidBus(bus) else { return "device \(id) names bus '\(TerminalText.escape(bus))'" }
        if let fdsets, fdsets.count > 2 || fdsets.contains(where: { !(0...1_000_000).contains($0) }) { return "device \(id) names fd sets out of range" }
        return nil
    }

    /// One line for people: `nic0 hotplug0 02:..:01 tap tap0 (netns /run/netns/x)`.
    public var summary: String {
        var parts = [id, kind.rawValue, bus]
        switch kind {
        case .nic:
            if let mac { parts.append(mac.description) }
            if let tap { parts.append("tap \(tap)\(netns.map { " in \($0)" } ?? "")\(tapCreated == true ? " (made for this clone)" : "")") }
            if fromFD == true { parts.append(tap == nil ? "tap (given as a descriptor)" : "(given as a descriptor)") }
            if backend == "user" { parts.append("user-mode" + (hostForwards.map { $0.isEmpty ? "" : " hostfwd " + $0.joined(separator: " ") } ?? "")) }
        case .disk:
            if let path { parts.append(path) }
            if fromFD == true { parts.append("image given as a descriptor") }
            if let format { parts.append(format.rawValue) }
            if overlay == true { parts.append("overlay \(overlayFileName)") }
            if readOnly == true { parts.append("read-only") }
            if let serial { parts.append("serial \(serial)") }
        }
        return TerminalText.escape(parts.joined(separator: "  "))
    }
}
