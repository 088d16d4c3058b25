import Foundation
import VMTemplateOS
import VMTemplateQEMU
import VMTemplateStore

/// Whether a clone's guest sees the devices hot-plugged into it: a NIC by its MAC address, a disk
/// by its virtio serial, asked over the control channel (`ifaces`, `serials`) or the guest agent
/// (`guest-network-get-interfaces`, `guest-get-disks`).
///
/// A device is in the machine when `clone` or `device add` returns, but the guest finds it only
/// once its kernel has handled the hot-plug: 0.5–1 s for a NIC of a fresh TCG clone. Nothing on
/// the clone path waits for that; `serve` (``CloneWatcher``) and `clone --wait-devices` do, and
/// record `devices_ready` and the journal's `clone.devices-ready`.
public struct DeviceReadiness: Sendable {
    public let store: TemplateStore

    public init(store: TemplateStore) {
        self.store = store
    }

    /// How often the guest is asked.
    static let pollInterval = Duration.milliseconds(100)

    /// Waits until the guest sees every device of the clone, then records it. Returns the record
    /// as written; throws `timeout` (naming the devices not seen) after `timeout`.
    @discardableResult
    public func wait(for record: CloneRecord, timeout: Duration) async throws -> CloneRecord {
        let devices = record.devices ?? []
        guard !devices.isEmpty else { return record }
        if let refusal = CloneLifecycle.refusalBeforeHandOut(record) { throw refusal }
        let deadline = ContinuousClock.now + timeout
        let probe = probe(for: record)
        var missing = devices.map(\.id)
        var lastError: String?
        while true {
            do {
                let seen = try await onOwnThread { try probe(deadline) }
                missing = devices.filter { !seen.contains($0.id) }.map(\.id)
                lastError = nil
            } catch {
                lastError = VMTemplateError.oneLine(error)
            }
            if missing.isEmpty { break }
            guard ContinuousClock.now + Self.pollInterval < deadline else {
                throw VMTemplateError(.timeout, "the guest of clone \(record.id) did not see \(missing.joined(separator: ", ")) within \(timeout.shortText)\(lastError.map { " (\($0))" } ?? ""): check that its kernel has the driver (virtio_net, virtio_blk) and handles PCIe hot-plug.")
            }
            try await Task.sleep(for: Self.pollInterval)
        }
        var first = false
        return try await store.updateClone(record.id, reporting: { updated in
            guard first, let updated else { return nil }
            var event = StoreEvent(.cloneDevicesReady, of: updated)
            event.devices = devices.map(\.id)
            return event
        }) { updated in
            // Devices added or removed meanwhile are another round's.
            guard (updated.devices ?? []).map(\.id) == devices.map(\.id), updated.devicesReady != true else { return }
            updated.devicesReady = true
            first = true
        } ?? record
    }

    /// The IDs of the clone's devices its guest sees, asked once (blocking: for a thread of its
    /// own). Every answer is the guest's and bounded by the channel it comes through.
    func probe(for record: CloneRecord) -> @Sendable (ContinuousClock.Instant) throws -> Set<String> {
        let devices = record.devices ?? []
        let paths = store.clonePaths(record.id)
        let root = store.root
        let wantsDisks = devices.contains { $0.kind == .disk }
        let wantsNICs = devices.contains { $0.kind == .nic }
        let viaAgent = record.guestAgent == true
        return { deadline in
            var macs: Set<String> = []
            var serials: Set<String> = []
            if viaAgent {
                let timeout = max(.milliseconds(10), ContinuousClock.now.duration(to: deadline))
                let agent = try GuestAgentConnection.connect(path: paths.agentSocket, storeRoot: root, timeout: timeout)
                defer { agent.close() }
                try agent.synchronize(until: deadline)
                if wantsNICs, let interfaces = try agent.execute("guest-network-get-interfaces", until: deadline) as? [[String: Any]] {
                    macs = Set(interfaces.compactMap { ($0["hardware-address"] as? String)?.lowercased() })
                }
                if wantsDisks, let disks = try agent.execute("guest-get-disks", until: deadline) as? [[String: Any]] {
                    serials = Set(disks.compactMap { (($0["address"] as? [String: Any])?["serial"] as? String)?.lowercased() })
                }
            } else {
                let channel = ControlChannel(path: paths.controlSocket, storeRoot: root)
                let timeout = max(.milliseconds(10), ContinuousClock.now.duration(to: deadline))
                if wantsNICs { macs = Self.values(in: try channel.exchange("ifaces", timeout: timeout)) }
                if wantsDisks { serials = Self.values(in: try channel.exchange("serials", timeout: timeout)) }
            }
            return Set(devices.filter { device in
                switch device.kind {
                case .nic: device.mac.map { macs.contains($0.description.lowercased()) } ?? false
                case .disk: device.serial.map { serials.contains($0.lowercased()) } ?? false
                }
            }.map(\.id))
        }
    }

    /// The values of a `NAME=VALUE NAME=VALUE` reply (the control channel's `ifaces`, `serials`).
    static func values(in reply: String) -> Set<String> {
        Set(reply.split(separator: " ").compactMap { pair in
            pair.split(separator: "=", maxSplits: 1).dropFirst().first.map { String($0).lowercased() }
        })
    }
}
