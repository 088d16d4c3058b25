import Foundation
import VMTemplateOS

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// A device ready to be hot-plugged: what the record will say, and the descriptors QEMU gets
/// (a NIC's tap; a disk's image, or its overlay then its base).
public struct PreparedDevice: Sendable {
    public var device: AttachedDevice
    public var descriptors: [Int32]
    /// What its caller handed over, when it did (`fd=`): marked once QEMU has a copy.
    public var given: GivenDescriptor?

    public init(device: AttachedDevice, descriptors: [Int32], given: GivenDescriptor? = nil) {
        self.device = device
        self.descriptors = descriptors
        self.given = given
    }

    /// This process's copies; QEMU keeps its own.
    public func closeDescriptors() {
        for descriptor in descriptors where descriptor >= 0 { close(descriptor) }
    }
}

/// Hot-plug and unplug over QMP, the way Kata does it: the backend first (`getfd` + `netdev_add`,
/// or `add-fd` + `blockdev-add`), then the guest-visible device (`device_add` into a free root
/// port); in reverse to remove. A step that fails undoes the ones before it, so a device is either
/// attached whole or not at all.
extension QMPClient {
    /// Attaches `prepared` and returns the record of it (with the fd sets QEMU holds).
    public func attach(_ prepared: PreparedDevice, timeout: Duration = .seconds(10)) async throws -> AttachedDevice {
        let device = try await addBackend(prepared, timeout: timeout)
        try await addFrontend(device, timeout: timeout)
        return device
    }

    /// The backend alone (`getfd` + `netdev_add`, `add-fd` + `blockdev-add`): nothing the guest
    /// sees, and nothing in the migration stream, so a clone adds it while its state still loads.
    public func addBackend(_ prepared: PreparedDevice, timeout: Duration = .seconds(10)) async throws -> AttachedDevice {
        var device = prepared.device
        var passedFD = false
        var fdsets: [Int] = []
        do {
            switch device.kind {
            case .nic:
                var netdev: [String: JSONValue] = ["id": .string(device.netdevID)]
                if device.backend == "tap" {
                    guard let tap = prepared.descriptors.first else { throw VMTemplateError(.internalError, "NIC \(device.id) has no tap descriptor.") }
                    // Set first: a getfd that timed out may still have been run.
                    passedFD = true
                    try await getFD(tap, name: device.netdevID)
                    netdev["type"] = .string("tap")
                    netdev["fd"] = .string(device.netdevID)
                } else {
                    netdev["type"] = .string("user")
                    if let forwards = device.hostForwards, !forwards.isEmpty {
                        netdev["hostfwd"] = .array(forwards.map { .object(["str": .string($0)]) })
                    }
                }
                try await execute("netdev_add", arguments: JSONValue.object(netdev), timeout: timeout)
            case .disk:
                for descriptor in prepared.descriptors { fdsets.append(try await addFD(descriptor).fdset) }
                device.fdsets = fdsets
                let blockDevices = prepared.descriptors.map(Self.isBlockDevice)
                try await execute("blockdev-add", arguments: Self.blockdev(for: device, blockDevices: blockDevices), timeout: timeout)
            }
            // QEMU holds a copy now: a token that named it is spent, whatever happens next.
            prepared.given?.markAttached()
            return device
        } catch {
            // Undo what was done, even when the task was cancelled (an interrupted command): each
            // step waits for QEMU's reply, so closing the connection afterwards cannot drop it.
            let (undone, passedFD, fdsets) = (device, passedFD, fdsets)
            await uncancellable {
                if passedFD { try? await self.execute("closefd", arguments: ["fdname": undone.netdevID]) }
                for fdset in fdsets { try? await self.execute("remove-fd", arguments: FDSetID(fdsetID: fdset)) }
            }
            throw Self.explain(error, attaching: device)
        }
    }

    /// The guest-visible device (`device_add` into its root port), on a backend added before;
    /// if QEMU refuses it, the backend goes too.
    public func addFrontend(_ device: AttachedDevice, timeout: Duration = .seconds(10)) async throws {
        var arguments: [String: JSONValue] = ["id": .string(device.id), "bus": .string(device.bus)]
        switch device.kind {
        case .nic:
            arguments["driver"] = .string("virtio-net-pci")
            arguments["netdev"] = .string(device.netdevID)
            if let mac = device.mac { arguments["mac"] = .string(mac.description) }
        case .disk:
            arguments["driver"] = .string("virtio-blk-pci")
            arguments["drive"] = .string(device.nodeName)
            if let serial = device.serial { arguments["serial"] = .string(serial) }
        }
        do {
            try await execute("device_add", arguments: JSONValue.object(arguments), timeout: timeout)
        } catch {
            await uncancellable {
                try? await self.removeBackend(of: device)
                for fdset in device.fdsets ?? [] { try? await self.execute("remove-fd", arguments: FDSetID(fdsetID: fdset)) }
            }
            throw Self.explain(error, attaching: device)
        }
    }

    /// Asks the guest to release `device` (`device_del`), waits until QEMU says it is gone
    /// (`DEVICE_DELETED`; the guest has to cooperate, so this takes as long as the guest does),
    /// then removes its backend and fd sets.
    public func detach(_ device: AttachedDevice, timeout: Duration) async throws {
        var present = true
        do {
            try await execute("device_del", arguments: ["id": device.id])
        } catch let error as QMPError where error.errorClass == "DeviceNotFound" {
            // Already gone from the guest (an earlier attempt that timed out; its event went to
            // that connection): remove the rest.
            present = false
        }
        if present {
            do {
                _ = try await waitForEvent("DEVICE_DELETED", timeout: timeout) { $0.data?["device"]?.stringValue == device.id }
            } catch let error as VMTemplateError where error.code == .timeout {
                if try await deviceStillPresent(device.id) {
                    throw VMTemplateError(.timeout, "the guest did not release \(device.id) within \(timeout.shortText) (its OS must answer the unplug request): it stays attached; try again, or remove the clone.", cause: error)
                }
            }
        }
        do {
            try await removeBackend(of: device)
        } catch let error as QMPError where error.errorClass == "DeviceNotFound" || error.desc.contains("not found") {
            // Removed by an earlier attempt.
        }
        for fdset in device.fdsets ?? [] { try? await execute("remove-fd", arguments: FDSetID(fdsetID: fdset)) }
    }

    /// `getfd`: hands `descriptor` to QEMU under `name` (for `netdev_add ... fd=NAME`).
    public func getFD(_ descriptor: Int32, name: String) async throws {
        let command = QMPCommand("getfd", arguments: ["fdname": name])
        let sent = try connection.sendAll([command], passing: descriptor)
        _ = try await connection.reply(to: sent[0].id, command: command.name, timeout: .seconds(10))
    }

    private func removeBackend(of device: AttachedDevice) async throws {
        switch device.kind {
        case .nic: try await execute("netdev_del", arguments: ["id": device.netdevID])
        case .disk: try await execute("blockdev-del", arguments: ["node-name": device.nodeName])
        }
    }

    private func deviceStillPresent(_ id: String) async throws -> Bool {
        do {
            let found = try await execute("qom-get", arguments: ["path": "/machine/peripheral/\(id)", "property": "type"], as: JSONValue.self)
            return found.stringValue != nil
        } catch let error as QMPError where error.errorClass == "DeviceNotFound" {
            return false
        }
    }

    /// The IDs of the devices QEMU has, and of the backends it has for them: whatever a record
    /// does not know of (an interrupted command's) must not be picked again.
    /// The root ports (by ID) that hold a device now, whoever plugged it: a runtime may hot-plug
    /// its own devices over the clone's QMP socket, which the clone's record does not know.
    public func occupiedBuses() async throws -> Set<String> {
        let buses = try await execute("query-pci", as: [PCIBus].self)
        var occupied: Set<String> = []
        func visit(_ devices: [PCIDevice]) {
            for device in devices {
                if let below = device.bridge?.devices {
                    if !below.isEmpty, let id = device.qdevID, !id.isEmpty { occupied.insert(id) }
                    visit(below)
                }
            }
        }
        for bus in buses { visit(bus.devices) }
        return occupied
    }

    public func deviceIDsInUse() async throws -> Set<String> {
        let peripherals = try await execute("qom-list", arguments: ["path": "/machine/peripheral"], as: [QOMProperty].self)
        var ids = Set(peripherals.filter { $0.type.hasPrefix("child<") }.map(\.name))
        let nodes = try await execute("query-named-block-nodes", as: [BlockNode].self)
        for node in nodes where node.nodeName.hasPrefix("node-") { ids.insert(String(node.nodeName.dropFirst(5))) }
        return ids
    }

    /// The `blockdev-add` of a disk: a format node on a protocol node reading `/dev/fdset/N`
    /// (`file` for a regular file, `host_device` for a block device, as QEMU requires); with an
    /// overlay, a qcow2 node on the overlay whose backing node is the base, read-only. A qcow2
    /// base gets `backing: null`: its header's backing name is never followed. `blockDevices`
    /// says, per fd set, whether its descriptor is a block device.
    static func blockdev(for device: AttachedDevice, blockDevices: [Bool] = []) throws -> JSONValue {
        guard let format = device.format, let fdsets = device.fdsets, !fdsets.isEmpty else {
            throw VMTemplateError(.internalError, "disk \(device.id) has no format or descriptors.")
        }
        func file(_ index: Int) -> JSONValue {
            let driver = index < blockDevices.count && blockDevices[index] ? "host_device" : "file"
            return .object(["driver": .string(driver), "filename": .string("/dev/fdset/\(fdsets[index])")])
        }
        func formatNode(_ name: String, _ format: DiskFormat, _ index: Int, readOnly: Bool) -> [String: JSONValue] {
            var node: [String: JSONValue] = ["driver": .string(format.rawValue), "node-name": .string(name), "read-only": .bool(readOnly), "file": file(index)]
            if format == .qcow2 { node["backing"] = .null }
            return node
        }
        if device.overlay == true {
            guard fdsets.count == 2 else { throw VMTemplateError(.internalError, "overlay disk \(device.id) needs two descriptors.") }
            var overlay = formatNode(device.nodeName, .qcow2, 0, readOnly: false)
            overlay["backing"] = .object(formatNode("\(device.nodeName)-base", format, 1, readOnly: true))
            return .object(overlay)
        }
        return .object(formatNode(device.nodeName, format, 0, readOnly: device.readOnly == true))
    }

    /// Whether `descriptor` is open on a block device.
    static func isBlockDevice(_ descriptor: Int32) -> Bool {
        var info = stat()
        return fstat(descriptor, &info) == 0 && (info.st_mode & S_IFMT) == S_IFBLK
    }

    /// QEMU's words for the failures a user can do something about, turned into ones that say what.
    static func explain(_ error: any Error, attaching device: AttachedDevice) -> any Error {
        guard let qmp = error as? QMPError else { return error }
        let what = device.kind == .disk ? "disk \(device.path.map { "'\(TerminalText.escape($0))'" } ?? device.id)" : "NIC \(device.id)"
        if qmp.desc.contains("Failed to get") && qmp.desc.contains("lock") {
            // QEMU's image locks: "write" when somebody else has it open at all, "shared write"
            // when somebody else writes it.
            if qmp.desc.contains("shared") {
                return VMTemplateError(.busy, "\(what) is being written by another process (another clone attached it read-write?): a read-only disk or an overlay's base must not change under the guest. Detach it there first (vmtemplate device rm).", cause: qmp)
            }
            return VMTemplateError(.busy, "\(what) is open in another process (another clone?), so this clone cannot write it: attach it with overlay=on (a copy-on-write overlay of its own) or readonly=on.", cause: qmp)
        }
        if qmp.desc.contains("host forwarding rule") {
            // The host's port is taken (by another clone's rule, or any program): the host's
            // state, not QEMU failing.
            return VMTemplateError(.busy, "\(what): \(VMTemplateError.phrase(TerminalText.escape(qmp.desc))), its host port is in use: pick another port in hostfwd.", cause: qmp)
        }
        return VMTemplateError(.qemuFailed, "QEMU could not attach \(what): \(VMTemplateError.phrase(TerminalText.escape(qmp.desc))).", cause: qmp)
    }
}

/// What `query-pci` says, as far as finding the devices below each bridge needs.
struct PCIBus: Decodable, Sendable {
    let devices: [PCIDevice]
}

struct PCIDevice: Decodable, Sendable {
    let qdevID: String?
    let bridge: PCIBridge?

    enum CodingKeys: String, CodingKey {
        case qdevID = "qdev_id"
        case bridge = "pci_bridge"
    }
}

struct PCIBridge: Decodable, Sendable {
    let devices: [PCIDevice]?
}

struct QOMProperty: Decodable, Sendable {
    let name: String
    let type: String
}

struct BlockNode: Decodable, Sendable {
    let nodeName: String

    enum CodingKeys: String, CodingKey {
        case nodeName = "node-name"
    }
}

struct FDSetID: Encodable, Sendable {
    let fdsetID: Int

    enum CodingKeys: String, CodingKey {
        case fdsetID = "fdset-id"
    }
}
