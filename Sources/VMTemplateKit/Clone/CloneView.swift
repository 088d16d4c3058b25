import VMTemplateOS
import VMTemplateQEMU
import VMTemplateStore
import Foundation

/// One clone, as every command and the API show it: `clone --json`, `inspect --json`'s `clone`,
/// `list --json`'s `clones`, and the API's clone objects. Made from the record as it was written
/// (``init(_:paths:)``: what `clone` returns, memory unmeasured) or with the clone's live state
/// and memory (``CloneLifecycle/status(of:qmpTimeout:settings:)``).
public struct CloneView: Sendable, Codable, Equatable {
    public var id: String
    public var name: String
    public var template: String
    public var pid: Int32?
    public var state: CloneState
    public var createdAt: Date
    public var uptimeSeconds: Double
    /// Guest pages copied on write: the clone's own share of guest memory (null: not measured).
    public var cowBytes: UInt64?
    public var cowPages: UInt64?
    /// Template pages the clone maps, shared with the template's page cache and other clones.
    public var templateResidentBytes: UInt64?
    /// QEMU's own private memory (heap, translation cache), apart from the guest's pages.
    public var privateBytes: UInt64?
    public var qmpSocket: String
    public var controlSocket: String
    public var serialLog: String
    public var vmgenid: String?
    /// `requested` (clock and hostname sent, not awaited), `none` or `not-sent`.
    public var clock: String?
    /// The guest agent's socket, for a template whose guest runs one (null otherwise).
    public var agentSocket: String?
    /// The per-clone setup through the guest agent: `running`, `done` or `failed` (null: none).
    public var guestSetup: String?
    public var devices: [AttachedDevice]
    /// Handed out from the template's warm pool.
    public var fromPool: Bool
    /// Where its start took its time.
    public var timings: CloneTimings?
    /// The clone's copy-on-write limit (null: none), the action the scheduler takes over it (the
    /// clone's own, else the store's), and the last action it took.
    public var cowLimitBytes: UInt64?
    public var overLimitAction: OverLimitAction?
    public var lastEnforcement: Enforcement?
    /// Who paused it (`user` or `scheduler`) while it is paused; null otherwise.
    public var pausedBy: PausedBy?
    /// In the answer to a create: false when it was a retry and this is the clone it had made.
    /// Null elsewhere.
    public var created: Bool?
    /// How its QEMU ended, once noticed (null while it runs).
    public var exit: CloneExit?
    /// Whether the guest has been seen to have every device: false until then, null without
    /// devices (``DeviceReadiness``).
    public var devicesReady: Bool?

    /// The clone as its record says, memory unmeasured.
    public init(_ record: CloneRecord, paths: InstancePaths, overLimitDefault: OverLimitAction? = nil) {
        id = record.id
        name = record.name
        template = record.template
        pid = record.qemu?.pid
        state = record.state
        createdAt = record.createdAt
        uptimeSeconds = max(0, Date().timeIntervalSince(record.createdAt))
        qmpSocket = paths.qmpSocket
        controlSocket = paths.controlSocket
        serialLog = paths.serialLog
        vmgenid = record.vmgenid
        clock = record.clock
        agentSocket = record.guestAgent == true ? paths.agentSocket : nil
        guestSetup = record.guestSetup
        devices = record.devices ?? []
        fromPool = record.fromPool == true
        timings = record.timings
        cowLimitBytes = record.cowLimitBytes
        overLimitAction = record.cowLimitBytes == nil ? nil : record.overLimitAction ?? overLimitDefault
        lastEnforcement = record.lastEnforcement
        pausedBy = record.state == .paused ? record.pausedBy : nil
        exit = record.exit
        devicesReady = record.devicesReady
    }

    enum CodingKeys: String, CodingKey {
        case id, name, template, pid, state, clock, devices, vmgenid, timings, created, exit
        case createdAt = "created_at"
        case uptimeSeconds = "uptime_seconds"
        case cowBytes = "cow_bytes"
        case cowPages = "cow_pages"
        case templateResidentBytes = "template_resident_bytes"
        case privateBytes = "private_bytes"
        case qmpSocket = "qmp_socket"
        case controlSocket = "control_socket"
        case serialLog = "serial_log"
        case agentSocket = "agent_socket"
        case guestSetup = "guest_setup"
        case fromPool = "from_pool"
        case devicesReady = "devices_ready"
        case cowLimitBytes = "cow_limit_bytes"
        case overLimitAction = "over_limit_action"
        case lastEnforcement = "last_enforcement"
        case pausedBy = "paused_by"
    }
}

extension CloneLifecycle {
    /// Live status of every clone, gathered concurrently: one slow QMP socket costs at most
    /// `qmpTimeout`, never the whole listing.
    public func statuses(of records: [CloneRecord], qmpTimeout: Duration = .milliseconds(500), parallel: Int = 16) async -> [CloneView] {
        // At most `parallel` at once: with hundreds of clones, one connection to each at the same
        // time would only queue on the two cores and the listen backlogs, and hold as many fds.
        let settings = try? store.settings()
        return await withTaskGroup(of: (Int, CloneView).self) { group in
            var result: [(Int, CloneView)] = []
            var pending = records.enumerated().makeIterator()
            func startNext() -> Bool {
                guard let (index, record) = pending.next() else { return false }
                group.addTask { (index, await status(of: record, qmpTimeout: qmpTimeout, settings: settings)) }
                return true
            }
            for _ in 0..<max(1, parallel) {
                if !startNext() { break }
            }
            for await item in group {
                result.append(item)
                _ = startNext()
            }
            return result.sorted { $0.0 < $1.0 }.map(\.1)
        }
    }

    /// The clone as its record says (state as recorded, memory unmeasured): what `clone` returns.
    public func view(of record: CloneRecord, settings: StoreSettings? = nil) -> CloneView {
        CloneView(record, paths: store.clonePaths(record.id), overLimitDefault: record.cowLimitBytes == nil ? nil : (settings ?? (try? store.settings()))?.overLimitAction)
    }

    /// The clone with its live state (``liveState(of:timeout:)``) and memory.
    public func status(of record: CloneRecord, qmpTimeout: Duration = .milliseconds(500), settings: StoreSettings? = nil) async -> CloneView {
        let state = await liveState(of: record, timeout: qmpTimeout)
        var status = view(of: record, settings: settings)
        status.state = state
        status.pausedBy = state == .paused ? record.pausedBy : nil
        if state != .exited, let pid = record.qemu?.pid, let usage = try? CloneMemoryUsage.measure(pid: pid, templateFile: record.memoryFile) {
            status.cowBytes = usage.copyOnWriteBytes
            status.cowPages = usage.copyOnWriteBytes / UInt64(max(1, sysconf(Int32(_SC_PAGESIZE))))
            status.templateResidentBytes = usage.templateResidentBytes
            status.privateBytes = usage.qemuPrivateBytes
        }
        return status
    }
}
