import VMTemplateOS
import VMTemplateQEMU
import Foundation

/// A clone's state as `list` reports it.
///
/// `starting` is written before QEMU is spawned, so an interrupted `clone` leaves a record that
/// `gc` recognizes. A warm pool will add a state for clones restored ahead of demand and left
/// paused; decoding unknown states as `unknown` keeps older binaries working with newer records.
public enum CloneState: String, Sendable, Codable, CaseIterable {
    case starting
    case running
    case paused
    case exited
    /// QEMU runs but its QMP socket did not answer in time.
    case unresponsive
    case unknown

    public init(from decoder: any Decoder) throws {
        let raw = try decoder.singleValueContainer().decode(String.self)
        self = CloneState(rawValue: raw) ?? .unknown
    }
}

/// `clones/ID/record.json`: everything needed to find, inspect and stop one clone.
public struct CloneRecord: Sendable, Codable, Equatable {
    public init(id: String, name: String, template: String, qemu: ProcessIdentity? = nil, qemuExecutable: String? = nil, creator: ProcessIdentity? = nil, createdAt: Date, state: CloneState, paths: InstancePaths, memoryFile: String, writableTemplate: Bool, vmgenid: String? = nil, qemuArguments: [String], restoreSeconds: Double? = nil, guestMemoryBytes: UInt64? = nil, cowLimitBytes: UInt64? = nil, overLimitAction: OverLimitAction? = nil, lastEnforcement: Enforcement? = nil) {
        self.id = id
        self.name = name
        self.template = template
        self.qemu = qemu
        self.qemuExecutable = qemuExecutable
        self.creator = creator
        self.createdAt = createdAt
        self.state = state
        self.paths = paths
        self.memoryFile = memoryFile
        self.writableTemplate = writableTemplate
        self.vmgenid = vmgenid
        self.qemuArguments = qemuArguments
        self.restoreSeconds = restoreSeconds
        self.guestMemoryBytes = guestMemoryBytes
        self.cowLimitBytes = cowLimitBytes
        self.overLimitAction = overLimitAction
        self.lastEnforcement = lastEnforcement
    }

    public var id: String
    public var name: String
    public var template: String
    /// The QEMU process; its start time makes the identity safe against PID reuse.
    public var qemu: ProcessIdentity?
    /// The QEMU binary it runs, checked against `/proc/PID/exe` before it is signalled.
    public var qemuExecutable: String?
    /// The `vmtemplate clone` process that made it, so `gc` can tell an interrupted clone from one
    /// still being set up.
    public var creator: ProcessIdentity?
    public var createdAt: Date
    /// The state at the last change vmtemplate made; `list` checks the live one.
    public var state: CloneState
    public var paths: InstancePaths
    /// The template RAM file the clone maps (private), for memory accounting.
    public var memoryFile: String
    /// Whether the clone opened the template read-write (QEMU < 8.2, `--allow-writable-template`).
    public var writableTemplate: Bool
    public var vmgenid: String?
    public var qemuArguments: [String]
    /// Time from the command's start until the guest ran, in seconds.
    public var restoreSeconds: Double?
    /// Guest RAM size, for admission (what a clone can commit at most).
    public var guestMemoryBytes: UInt64?
    /// Copy-on-write the clone may use before the scheduler acts (nil: no limit).
    public var cowLimitBytes: UInt64?
    /// What the scheduler does over the limit (nil: the store's setting).
    public var overLimitAction: OverLimitAction?
    /// The scheduler's last action on this clone.
    public var lastEnforcement: Enforcement?

    enum CodingKeys: String, CodingKey {
        case id, name, template, qemu, creator
        case qemuExecutable = "qemu_executable"
        case createdAt = "created_at"
        case state, paths
        case memoryFile = "memory_file"
        case writableTemplate = "writable_template"
        case vmgenid
        case qemuArguments = "qemu_arguments"
        case restoreSeconds = "restore_seconds"
        case guestMemoryBytes = "guest_memory_bytes"
        case cowLimitBytes = "cow_limit_bytes"
        case overLimitAction = "over_limit_action"
        case lastEnforcement = "last_enforcement"
    }

    /// Memory this clone commits against the store's budget.
    public var committedBytes: UInt64 {
        Admission.committedBytes(guestMemory: guestMemoryBytes ?? cowLimitBytes ?? 0, cowLimit: cowLimitBytes)
    }

    /// Whether the clone counts against the store's limits: being set up, or its QEMU alive.
    public var isLive: Bool {
        if let qemu { return qemu.isAlive }
        return state == .starting && creator?.isAlive == true
    }

    /// The `-name` its QEMU runs with: how ``QEMUInstance/attach(identity:name:qmpSocket:logPath:executable:)``
    /// recognises it.
    public static func qemuName(id: String) -> String { "vmtemplate-clone-\(id)" }

    /// A fresh clone ID: 12 hex digits, unique enough for one host, short enough for socket paths.
    public static func newID() -> String {
        (0..<6).map { _ in String(format: "%02x", UInt8.random(in: 0...255)) }.joined()
    }
}

/// One action of the scheduler, as logged (one JSON line) and kept in the clone's record.
public struct Enforcement: Sendable, Codable, Equatable {
    public var time: Date
    public var clone: String
    public var name: String
    public var cowBytes: UInt64
    public var limitBytes: UInt64
    public var action: OverLimitAction
    /// Whether the action took effect; `error` says why not.
    public var done: Bool
    public var error: String?

    public init(time: Date, clone: String, name: String, cowBytes: UInt64, limitBytes: UInt64, action: OverLimitAction, done: Bool, error: String?) {
        self.time = time
        self.clone = clone
        self.name = name
        self.cowBytes = cowBytes
        self.limitBytes = limitBytes
        self.action = action
        self.done = done
        self.error = error
    }

    enum CodingKeys: String, CodingKey {
        case time, clone, name
        case cowBytes = "cow_bytes"
        case limitBytes = "limit_bytes"
        case action, done, error
    }
}

/// The part of the store that holds clone records.
extension TemplateStore {
    public func cloneDirectory(_ id: String) -> String { "\(clonesDirectory)/\(id)" }

    func recordPath(_ id: String) -> String { "\(cloneDirectory(id))/record.json" }

    /// Writes a record atomically. Not synced: a clone does not survive the machine going down,
    /// and the rename keeps readers from ever seeing half a record.
    public func save(_ record: CloneRecord) throws {
        try StoredJSON.write(record, to: recordPath(record.id), durable: false)
    }

    /// Changes one clone's record under the store lock (read, change, write), so concurrent
    /// writers never lose each other's changes. Returns nil when the clone is gone.
    @discardableResult
    public func updateClone(_ id: String, _ change: (inout CloneRecord) throws -> Void) throws -> CloneRecord? {
        try update(CloneRecord.self, at: recordPath(id), durable: false, change)
    }

    /// All clone records, oldest first; unreadable ones go to `problems` with their directory.
    public func clones() -> (records: [CloneRecord], problems: [String]) {
        var (found, unreadable) = StoredJSON.readAll(CloneRecord.self, file: "record.json", in: clonesDirectory, what: "clone record")
        var problems = unreadable.map { "\($0); 'vmtemplate gc' removes it." }
        found.removeAll { entry in
            guard entry.value.id != entry.entry else { return false }
            problems.append("clone record \(recordPath(entry.entry)) names clone '\(entry.value.id)', not its directory: it is ignored; 'vmtemplate gc' removes it.")
            return true
        }
        return (found.map(\.value).sorted { $0.createdAt < $1.createdAt }, problems)
    }

    /// The clone directories whose record cannot be read (with the reason), for `gc`.
    public func unreadableClones() -> [(id: String, problem: StoredJSON.ReadFailure)] {
        StoredJSON.entries(of: clonesDirectory).compactMap { entry in
            switch StoredJSON.read(CloneRecord.self, at: recordPath(entry)) {
            case .success(let record) where record.id == entry: return nil
            case .success: return (entry, .invalid("it names another clone"))
            case .failure(let failure): return (entry, failure)
            }
        }
    }

    /// Finds clones by ID, ID prefix (unambiguous) or name.
    public func findClone(_ reference: String) throws -> CloneRecord {
        let records = clones().records
        if let exact = records.first(where: { $0.id == reference || $0.name == reference }) { return exact }
        let byPrefix = records.filter { $0.id.hasPrefix(reference) }
        if byPrefix.count == 1 { return byPrefix[0] }
        if byPrefix.count > 1 {
            throw VMTemplateError(.invalidArgument, "'\(reference)' matches \(byPrefix.count) clones: give more of the ID.")
        }
        throw VMTemplateError(.notFound, "no clone with ID or name '\(reference)': see 'vmtemplate list'.")
    }
}
