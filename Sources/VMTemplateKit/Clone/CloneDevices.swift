import Foundation
import VMTemplateOS
import VMTemplateQEMU
import VMTemplateStore

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// The NICs and disks asked for a clone (`clone --nic/--disk`, `device add`).
public struct DeviceRequest: Sendable, Equatable {
    public var nics: [NICSpec]
    public var disks: [DiskSpec]

    public init(nics: [NICSpec] = [], disks: [DiskSpec] = []) {
        self.nics = nics
        self.disks = disks
    }

    public var count: Int { nics.count + disks.count }

    /// From the specs `--nic`/`--disk` (and the API's `nics`/`disks`) take; the first bad one
    /// is the error. `fd=` finds its descriptor with `descriptors`.
    public init(parsingNICs nics: [String], disks: [String], descriptors: DescriptorLookup = .none) throws {
        self.init(nics: try nics.map { try NICSpec(parsing: $0, descriptors: descriptors) },
                  disks: try disks.map { try DiskSpec(parsing: $0, descriptors: descriptors) })
    }
}

/// A clone's NICs and disks: opened before its QEMU is asked anything, hot-plugged, recorded,
/// unplugged (`clone --nic/--disk`, `device add/rm`).
public struct CloneDevices: Sendable {
    /// The store the clones are in.
    public let store: TemplateStore

    public init(store: TemplateStore) {
        self.store = store
    }

    /// Names each requested device (`nicN`, `diskN`), gives it a free root port, a MAC or a
    /// serial that names the clone, and opens what it needs: the tap (in its namespace), the
    /// image, and for `overlay=on` a new overlay in the clone's directory. Everything a user can
    /// get wrong fails here, before QEMU is asked anything; on failure nothing is left open or
    /// made. The caller closes the descriptors of what it gets and removes the overlays of
    /// devices it does not attach.
    static func open(_ request: DeviceRequest, cloneID: String, cloneDirectory: String, existing: [AttachedDevice], slots: Int, idsInUse: Set<String> = [], busesInUse: Set<String> = []) throws -> [PreparedDevice] {
        let buses = (0..<max(0, min(slots, MachineSpec.maxHotplugSlots))).map { "hotplug\($0)" }
        var taken = existing
        var pending: [PreparedDevice] = []
        func next(_ kind: AttachedDevice.Kind) throws -> AttachedDevice {
            guard let bus = buses.first(where: { bus in !taken.contains { $0.bus == bus } && !busesInUse.contains(bus) }) else {
                let used = Set(taken.map(\.bus)).union(busesInUse.intersection(buses)).count
                throw VMTemplateError(.limitExceeded, "clone \(cloneID) has no free hot-plug slot (its template has \(buses.count); \(used) in use): remove a device first (vmtemplate device rm), or give the template more with \"hotplug_slots\" in its recipe.")
            }
            // Not an ID in the record, nor one QEMU has (a device an interrupted command left).
            let number = (0...).first { number in
                let id = "\(kind.rawValue)\(number)"
                return !taken.contains { $0.id == id } && !idsInUse.contains(id)
            } ?? 0
            let device = AttachedDevice(id: "\(kind.rawValue)\(number)", kind: kind, bus: bus)
            taken.append(device)
            return device
        }
        do {
            for nic in request.nics {
                var device = try next(.nic)
                device.mac = nic.mac ?? MACAddress.derived(seed: cloneID, index: Int(device.id.dropFirst(3)) ?? 0)
                switch nic.backend {
                case .tap(let name, let namespacePath):
                    let tap = try TapDevice.open(name: name, namespacePath: namespacePath)
                    device.backend = "tap"
                    device.tap = name
                    device.netns = namespacePath
                    device.tapCreated = tap.created
                    pending.append(PreparedDevice(device: device, descriptors: [tap.descriptor]))
                case .descriptor(let given):
                    device.backend = "tap"
                    device.tap = given.tapName
                    device.fromFD = true
                    pending.append(PreparedDevice(device: device, descriptors: [try given.duplicate()], given: given))
                case .user(let forwards):
                    device.backend = "user"
                    device.hostForwards = forwards
                    pending.append(PreparedDevice(device: device, descriptors: []))
                }
            }
            for disk in request.disks {
                var device = try next(.disk)
                device.path = disk.path
                device.fromFD = disk.path == nil ? true : nil
                device.format = disk.format
                device.readOnly = disk.readOnly
                device.overlay = disk.overlay
                // At most 20 bytes reach the guest (VIRTIO_BLK_ID_BYTES): 12 for the ID, 1, 7 left.
                device.serial = String("\(cloneID)-\(device.id)".prefix(20))
                let writable = !disk.readOnly && !disk.overlay
                var given: GivenDescriptor?
                let image: DiskImage
                switch disk.source {
                case .path(let path):
                    image = try DiskImage.open(path: path, format: disk.format, writable: writable)
                case .descriptor(let descriptor):
                    image = try DiskImage.adopt(descriptor, format: disk.format, writable: writable)
                    given = descriptor
                }
                if disk.overlay {
                    // The overlay first, then its base, as ``QMPClient/attach(_:timeout:)`` expects.
                    let overlay: Int32
                    do {
                        overlay = try image.createOverlay(at: CloneLayout(directory: cloneDirectory).overlay(of: device))
                    } catch {
                        close(image.descriptor)
                        throw error
                    }
                    pending.append(PreparedDevice(device: device, descriptors: [overlay, image.descriptor], given: given))
                } else {
                    pending.append(PreparedDevice(device: device, descriptors: [image.descriptor], given: given))
                }
            }
        } catch {
            for device in pending { device.closeDescriptors() }
            removeOverlays(of: pending, in: cloneDirectory)
            throw error
        }
        return pending
    }

    /// Deletes the overlays made for `devices` (ones that were not attached). The names come from
    /// checked device IDs, the directory from the store layout.
    static func removeOverlays(of devices: [PreparedDevice], in cloneDirectory: String) {
        for device in devices where device.device.overlay == true {
            unlink(CloneLayout(directory: cloneDirectory).overlay(of: device.device))
        }
    }

    /// Hot-plugs devices into a running clone (`vmtemplate device add`) and records them.
    /// One device operation at a time per clone (a lock in its directory), so two never pick the
    /// same slot or name.
    public func add(_ request: DeviceRequest, to reference: CloneRecord, timeout: Duration = .seconds(10)) async throws -> [AttachedDevice] {
        try await withDeviceLock(of: reference) { record, qemu in
            let directory = store.cloneDirectory(record.id)
            let qmp = try await qemu.connectQMP(timeout: timeout, phase: "device add")
            defer { qmp.close() }
            let prepared = try Self.open(request, cloneID: record.id, cloneDirectory: directory, existing: record.devices ?? [], slots: record.hotplugSlots ?? 0, idsInUse: try await qmp.deviceIDsInUse(), busesInUse: try await qmp.occupiedBuses())
            defer { for device in prepared { device.closeDescriptors() } }
            var attached: [AttachedDevice] = []
            do {
                for device in prepared {
                    let done = try await qmp.attach(device, timeout: timeout)
                    attached.append(done)
                    let recorded = attached
                    do {
                        try await store.updateClone(record.id, reporting: { updated in
                            var event = StoreEvent(.cloneDeviceAdded, of: updated ?? record)
                            event.devices = [done.id]
                            return event
                        }) { updated in
                            updated.devices = (record.devices ?? []) + recorded
                            updated.devicesReady = false
                        }
                    } catch {
                        // Attached but not recorded would be a device nobody can remove.
                        await uncancellable { try? await qmp.detach(done, timeout: timeout) }
                        attached.removeLast()
                        throw error
                    }
                }
                return attached
            } catch {
                Self.removeOverlays(of: prepared.filter { device in !attached.contains { $0.id == device.device.id } }, in: directory)
                throw error
            }
        }
    }

    /// Unplugs device `id` from a running clone (`vmtemplate device rm`): the guest is asked to
    /// release it and given `timeout` to do so; then its backend goes, its overlay is deleted and
    /// the record forgets it.
    public func remove(_ id: String, from reference: CloneRecord, timeout: Duration = .seconds(10)) async throws -> AttachedDevice {
        try await withDeviceLock(of: reference) { record, qemu in
            guard let device = record.devices?.first(where: { $0.id == id }) else {
                let known = (record.devices ?? []).map(\.id)
                throw VMTemplateError(.notFound, "clone \(record.id) has no device '\(TerminalText.escape(id))'\(known.isEmpty ? " (it has none)" : ": it has \(known.joined(separator: ", "))").")
            }
            // A paused guest cannot release it: said now, not after the timeout.
            if case .paused = await CloneLifecycle(store: store).liveState(of: record) {
                throw VMTemplateError(.invalidState, "clone \(record.id) is paused, so its guest cannot release \(id): resume it first (vmtemplate resume \(record.id)).")
            }
            let qmp = try await qemu.connectQMP(timeout: timeout, phase: "device rm")
            defer { qmp.close() }
            try await qmp.detach(device, timeout: timeout)
            if device.overlay == true {
                // The name comes from the checked device ID, the directory from the store layout.
                unlink(store.cloneLayout(record.id).overlay(of: device))
            }
            try await store.updateClone(record.id, reporting: { updated in
                var event = StoreEvent(.cloneDeviceRemoved, of: updated ?? record)
                event.devices = [id]
                return event
            }) { updated in
                updated.devices?.removeAll { $0.id == id }
                if updated.devices?.isEmpty == true {
                    updated.devices = nil
                    updated.devicesReady = nil
                }
            }
            return device
        }
    }

    /// Runs `body` with the clone's device lock held, on the record as it is under the lock and
    /// the clone's own QEMU.
    private func withDeviceLock<T: Sendable>(of reference: CloneRecord, _ body: (CloneRecord, QEMUInstance) async throws -> T) async throws -> T {
        let lock = try store.openLockFile(store.cloneLayout(reference.id).deviceLock)
        return try await lock.withExclusive {
            guard let record = store.cloneRecord(reference.id) else {
                throw VMTemplateError(.notFound, "clone \(reference.id) is gone.")
            }
            guard record.state == .running || record.state == .paused else {
                throw VMTemplateError(.invalidState, "clone \(record.id) is \(record.state.rawValue), not running: wait until 'vmtemplate clone' has returned.")
            }
            switch CloneLifecycle(store: store).qemu(of: record) {
            case .running(let qemu):
                return try await body(record, qemu)
            case .exited:
                throw VMTemplateError(.invalidState, "clone \(record.id) (\(TerminalText.escape(record.name))) has exited: remove it (vmtemplate rm \(record.id)).")
            case .notThisQEMU(let reason):
                throw VMTemplateError(.invalidState, "clone \(record.id) names a process that is not its QEMU (\(reason)): nothing was changed.")
            }
        }
    }
}
