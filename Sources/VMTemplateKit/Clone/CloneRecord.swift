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
    public var id: String
    public var name: String
    public var template: String
    /// The QEMU process; its start time makes the identity safe against PID reuse.
    public var qemu: ProcessIdentity?
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
    func save(_ record: CloneRecord) throws {
        try FileSystem.writeFileAtomically(path: recordPath(record.id), data: try JSONCoding.encode(record), mode: 0o644, durable: false)
    }

    /// Changes one clone's record under the store lock (read, change, write), so concurrent
    /// writers never lose each other's changes. Returns nil when the clone is gone.
    @discardableResult
    public func updateClone(_ id: String, _ change: (inout CloneRecord) throws -> Void) throws -> CloneRecord? {
        try withLock {
            guard let data = FileManager.default.contents(atPath: recordPath(id)) else { return nil }
            var record = try JSONCoding.decoder().decode(CloneRecord.self, from: data)
            try change(&record)
            try save(record)
            return record
        }
    }

    /// All clone records; unreadable ones go to `problems` with their directory.
    public func clones() -> (records: [CloneRecord], problems: [String]) {
        let entries = (try? FileManager.default.contentsOfDirectory(atPath: clonesDirectory)) ?? []
        var records: [CloneRecord] = []
        var problems: [String] = []
        for entry in entries.sorted() where !entry.hasPrefix(".") {
            guard let data = FileManager.default.contents(atPath: recordPath(entry)) else {
                // A clone being set up has its directory before its record; one that never got a
                // record is a leftover `gc` removes.
                continue
            }
            do {
                records.append(try JSONCoding.decoder().decode(CloneRecord.self, from: data))
            } catch {
                problems.append("clone record \(recordPath(entry)) is not valid: \(JSONErrorText.describe(error)); 'vmtemplate gc' removes it.")
            }
        }
        return (records.sorted { $0.createdAt < $1.createdAt }, problems)
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
