import VMTemplateOS
import VMTemplateQEMU
import Foundation

/// A clone's state as `list` reports it.
///
/// `starting` is written before QEMU is spawned, so an interrupted `clone` leaves a record that
/// `gc` recognizes; `warming` is the same for a warm-pool member being restored and warmed, and
/// `pooled` a member restored, warmed and paused, waiting to be handed out. Decoding unknown
/// states as `unknown` keeps older binaries working with newer records.
public enum CloneState: String, Sendable, Codable, CaseIterable {
    case starting
    case warming
    case pooled
    case running
    case paused
    case exited
    /// QEMU runs but its QMP socket did not answer in time.
    case unresponsive
    /// Another user's clone: this user may not reach its sockets.
    case notYours = "not-yours"
    case unknown

    public init(from decoder: any Decoder) throws {
        let raw = try decoder.singleValueContainer().decode(String.self)
        self = CloneState(rawValue: raw) ?? .unknown
    }
}

/// How a clone's QEMU ended: a record's and a clone object's `exit`, and what a `clone.exited`
/// event says.
public struct CloneExit: Sendable, Codable, Equatable {
    /// When vmtemplate noticed (within a second of the exit while `serve` runs).
    public var time: Date
    /// QEMU's exit status, or the signal that ended it: known only to the process that started it
    /// (a clone made through the API); null otherwise.
    public var exitStatus: Int32?
    public var signal: Int32?
    /// Why, in a few words: `exited`, `killed over its copy-on-write limit`, ...
    public var reason: String
    /// The last lines of its QEMU log, escaped, at most 300 characters.
    public var lastWords: String?

    public init(time: Date = Date(), exitStatus: Int32? = nil, signal: Int32? = nil, reason: String, lastWords: String? = nil) {
        self.time = time
        self.exitStatus = exitStatus
        self.signal = signal
        self.reason = reason
        self.lastWords = lastWords
    }

    /// Why a record's `exit` is not to be believed, or nil.
    var problem: String? {
        if let exitStatus, !(0...255).contains(exitStatus) { return "exit.exit_status \(exitStatus) is out of range" }
        if let signal, !(1...64).contains(signal) { return "exit.signal \(signal) is out of range" }
        if reason.utf8.count > 200 || (lastWords?.utf8.count ?? 0) > 600 { return "exit says too much" }
        return nil
    }

    enum CodingKeys: String, CodingKey {
        case time, signal, reason
        case exitStatus = "exit_status"
        case lastWords = "last_words"
    }
}

/// `clones/ID/record.json`: everything needed to find, inspect and stop one clone.
public struct CloneRecord: Sendable, Codable, Equatable {
    public init(id: String, name: String, template: String, qemu: ProcessIdentity? = nil, qemuExecutable: String? = nil, creator: ProcessIdentity? = nil, createdAt: Date, state: CloneState, templateStore: String? = nil, memoryFile: String, writableTemplate: Bool, vmgenid: String? = nil, qemuArguments: [String], restoreSeconds: Double? = nil, guestMemoryBytes: UInt64? = nil, cowLimitBytes: UInt64? = nil, overLimitAction: OverLimitAction? = nil, lastEnforcement: Enforcement? = nil) {
        self.id = id
        self.name = name
        self.template = template
        self.qemu = qemu
        self.qemuExecutable = qemuExecutable
        self.creator = creator
        self.createdAt = createdAt
        self.state = state
        self.templateStore = templateStore
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
    /// The store the template came from, when it is not the clone's own (`--template-store`).
    public var templateStore: String?
    /// The template RAM file the clone maps (private), for memory accounting. Always
    /// `TEMPLATE_STORE/templates/TEMPLATE/memory`: a record that says otherwise is not believed.
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
    /// What was done about the guest's clock and hostname at start: `requested` (sent; a forked
    /// child or a thread waits for the guest's answers, not `clone`), `none`, or `not-sent` (why:
    /// in the clone's guest-setup.log).
    public var clock: String?
    /// The template's machine has a guest agent port (``InstancePaths/agentSocket``).
    public var guestAgent: Bool?
    /// Where the per-clone setup through the guest agent is (``GuestClock/guestAgent``):
    /// `running`, `done` or `failed` (what each step did: the clone's guest-setup.log); nil when
    /// there is none.
    public var guestSetup: String?
    /// The machine's hot-plug root ports (the template's `hotplug_slots`).
    public var hotplugSlots: Int?
    /// Devices hot-plugged into the clone, in the order they were attached.
    public var devices: [AttachedDevice]?
    /// Handed out from a warm pool (restored ahead of demand) rather than restored on demand.
    public var fromPool: Bool?
    /// The uid that asked for the clone through the API (`serve`): it may remove it.
    public var requestedBy: UInt32?
    /// Where its start took its time (``CloneTimings``).
    public var timings: CloneTimings?
    /// Who paused the clone, while it is paused by vmtemplate: `user` (`vmtemplate pause`) or
    /// `scheduler` (over its copy-on-write limit). The scheduler never resumes a clone.
    public var pausedBy: PausedBy?
    /// The ``TemplateManifest/identity`` of the template it was made from: a template removed and
    /// made again under the same name is another template, whose pool never hands this one out.
    public var templateDigest: String?
    /// How its QEMU ended, once vmtemplate noticed (`serve`'s watcher, the scheduler).
    public var exit: CloneExit?
    /// Whether its guest has been seen to have every hot-plugged device (``devices``): false from
    /// the moment one is plugged until `serve` or `clone --wait-devices` sees it; nil without
    /// devices.
    public var devicesReady: Bool?

    enum CodingKeys: String, CodingKey {
        case id, name, template, qemu, creator, exit
        case devicesReady = "devices_ready"
        case qemuExecutable = "qemu_executable"
        case createdAt = "created_at"
        case state
        case templateStore = "template_store"
        case memoryFile = "memory_file"
        case writableTemplate = "writable_template"
        case vmgenid
        case qemuArguments = "qemu_arguments"
        case restoreSeconds = "restore_seconds"
        case guestMemoryBytes = "guest_memory_bytes"
        case cowLimitBytes = "cow_limit_bytes"
        case overLimitAction = "over_limit_action"
        case lastEnforcement = "last_enforcement"
        case clock
        case guestAgent = "guest_agent"
        case guestSetup = "guest_setup"
        case hotplugSlots = "hotplug_slots"
        case devices
        case fromPool = "from_pool"
        case requestedBy = "requested_by"
        case templateDigest = "template_digest"
        case pausedBy = "paused_by"
        case timings
    }

    /// Memory this clone commits against the store's budget.
    public var committedBytes: UInt64 {
        Admission.committedBytes(guestMemory: guestMemoryBytes ?? cowLimitBytes ?? 0, cowLimit: cowLimitBytes)
    }

    /// Whether the clone counts against the store's limits: being set up, or its QEMU alive.
    public var isLive: Bool {
        if let qemu { return qemu.isAlive }
        return isBeingSetUp && creator?.isAlive == true
    }

    /// Written by a command that is still setting the clone up (`clone`, or a pool filler): if
    /// that command is gone, the clone was interrupted.
    public var isBeingSetUp: Bool { state == .starting || state == .warming }

    /// Bounds on what a record may say; anything beyond is a record nobody should believe.
    public static let maxGuestMemoryBytes: UInt64 = 1 << 42  // 4 TiB
    public static let maxPID: Int32 = 1 << 22  // the kernel's PID_MAX_LIMIT

    /// Why this record cannot be believed as the record of the clone in directory `directoryName`
    /// of the store at `storeRoot`, or nil. A record is a claim by whoever wrote the file: its ID
    /// must be its directory's name, its names valid names, its numbers within bounds, and its
    /// template file where the store layout puts it.
    public func problem(directoryName: String, storeRoot: String) -> String? {
        guard id == directoryName else { return "it names clone '\(TerminalText.escape(id))', not its directory" }
        guard (try? EntityName(id, kind: "clone ID")) != nil else { return "its ID is not a valid name" }
        guard (try? EntityName(name, kind: "clone")) != nil else { return "its name '\(TerminalText.escape(name))' is not a valid clone name" }
        guard (try? EntityName(template)) != nil else { return "its template '\(TerminalText.escape(template))' is not a valid template name" }
        if let guestMemoryBytes, guestMemoryBytes > Self.maxGuestMemoryBytes { return "guest_memory_bytes \(guestMemoryBytes) is out of range" }
        if let cowLimitBytes, cowLimitBytes > Self.maxGuestMemoryBytes { return "cow_limit_bytes \(cowLimitBytes) is out of range" }
        if let restoreSeconds, !(restoreSeconds.isFinite && restoreSeconds >= 0 && restoreSeconds < 86_400) { return "restore_seconds is out of range" }
        for process in [qemu, creator].compactMap({ $0 }) where !(1...Self.maxPID).contains(process.pid) {
            return "PID \(process.pid) is out of range"
        }
        let templateRoot = templateStore ?? storeRoot
        guard templateRoot.hasPrefix("/"), !templateRoot.contains("/../"), memoryFile == "\(templateRoot)/templates/\(template)/memory" else {
            return "its memory file is not its template's"
        }
        guard qemuArguments.count <= 4096 else { return "it lists \(qemuArguments.count) QEMU arguments" }
        if let templateDigest, !TemplateManifest.isIdentity(templateDigest) { return "template_digest is not a sha256: digest" }
        if let timings, !timings.isPlausible { return "its timings are out of range" }
        if let attempt = lastEnforcement?.attempt, !(1...1000).contains(attempt) { return "last_enforcement.attempt \(attempt) is out of range" }
        if let hotplugSlots, !(0...MachineSpec.maxHotplugSlots).contains(hotplugSlots) { return "hotplug_slots \(hotplugSlots) is out of range" }
        if let clock, !["requested", "none", "not-sent"].contains(clock) { return "clock is not one vmtemplate writes" }
        if let guestSetup, !["running", "done", "failed"].contains(guestSetup) { return "guest_setup is not one vmtemplate writes" }
        if let exit, let problem = exit.problem { return problem }
        if let devices {
            guard devices.count <= MachineSpec.maxHotplugSlots else { return "it lists \(devices.count) devices" }
            if let problem = devices.lazy.compactMap(\.problem).first { return problem }
            guard Set(devices.map(\.id)).count == devices.count, Set(devices.map(\.bus)).count == devices.count else { return "two of its devices share an ID or a slot" }
        }
        return nil
    }

    /// The `-name` its QEMU runs with: how ``QEMUInstance/attach(identity:name:qmpSocket:logPath:executable:)``
    /// recognises it.
    public static func qemuName(id: String) -> String { "vmtemplate-clone-\(id)" }

    /// A fresh clone ID: 12 hex digits, unique enough for one host, short enough for socket paths.
    public static func newID() -> String {
        (0..<6).map { _ in String(format: "%02x", UInt8.random(in: 0...255)) }.joined()
    }
}

/// Where a clone's start took its time, in seconds, phase by phase: what `clone --json` and the
/// API report (`timings`), and what a runtime logs. A hand-out from a pool has no spawn and no
/// restore (they happened when the member was made).
public struct CloneTimings: Sendable, Codable, Equatable {
    /// The template checked, the clone admitted, its directory and first record made (for a
    /// hand-out: the member claimed and its record rewritten).
    public var admission: Double = 0
    /// Devices opened and QEMU started.
    public var spawn: Double = 0
    /// QMP handshake and the device state loaded, the guest still paused.
    public var restore: Double = 0
    /// NICs and disks hot-plugged (backends and frontends).
    public var devices: Double = 0
    /// `cont` (for a pool member being made: and warming).
    public var resume: Double = 0
    /// The final record written.
    public var records: Double = 0
    /// From the start of the call to its end.
    public var total: Double = 0

    public init() {}

    /// Whether every figure is a duration a clone could take.
    var isPlausible: Bool {
        [admission, spawn, restore, devices, resume, records, total].allSatisfy { $0.isFinite && $0 >= 0 && $0 < 86_400 }
    }
}

/// Who paused a clone.
public enum PausedBy: String, Sendable, Codable {
    case user
    case scheduler
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
    /// For a pause: which attempt in a row this was (1 unless the ones before failed).
    public var attempt: Int?
    /// A kill that replaced a pause that failed `pause_attempts` rounds in a row.
    public var escalated: Bool?

    public init(time: Date, clone: String, name: String, cowBytes: UInt64, limitBytes: UInt64, action: OverLimitAction, done: Bool, error: String?, attempt: Int? = nil, escalated: Bool? = nil) {
        self.attempt = attempt
        self.escalated = escalated
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
        case action, done, error, attempt, escalated
    }
}

/// The part of the store that holds clone records.
extension TemplateStore {
    public func cloneDirectory(_ id: String) -> String { "\(clonesDirectory)/\(id)" }

    /// The files of clone `id`: derived from the store layout, never read from its record.
    public func clonePaths(_ id: String) -> InstancePaths { InstancePaths(directory: cloneDirectory(id)) }

    /// Every file of clone `id`'s directory (``CloneLayout``).
    public func cloneLayout(_ id: String) -> CloneLayout { CloneLayout(directory: cloneDirectory(id)) }

    func recordPath(_ id: String) -> String { cloneLayout(id).record }

    /// Writes a record atomically. Not synced: a clone does not survive the machine going down,
    /// and the rename keeps readers from ever seeing half a record.
    public func save(_ record: CloneRecord) throws {
        try requireWritable()
        try StoredJSON.write(record, to: recordPath(record.id), durable: false)
    }


    /// Why the directory of clone `id` is not to be believed, or nil: it must be a directory (not a
    /// link) that the store's owner owns.
    func trustedCloneDirectory(_ id: String) -> String? {
        var info = stat()
        guard lstat(cloneDirectory(id), &info) == 0 else { return "it cannot be inspected (\(errnoText()))" }
        guard (info.st_mode & S_IFMT) == S_IFDIR else { return "it is not a directory (a link or a file)" }
        guard info.st_uid == ownerUID else { return "it belongs to uid \(info.st_uid), not to the store's owner (uid \(ownerUID))" }
        return nil
    }

    /// The record of clone `id` as it is on disk now, if it holds up (see ``listClones()``).
    public func cloneRecord(_ id: String) -> CloneRecord? {
        guard case .record(let record) = examineClone(id) else { return nil }
        return record
    }

    /// What one entry of `clones/` is, after every check ``listClones()`` makes.
    private enum CloneEntry {
        case record(CloneRecord)
        /// This user may not read it (another user's store).
        case notYours
        /// Not believed and not the owner's to clean up: reported only.
        case ignored(String)
        /// The owner's directory without a usable record: reported, and `gc` removes it.
        case broken(String)
    }

    private func examineClone(_ entry: String) -> CloneEntry {
        let display = TerminalText.escape(entry)
        guard (try? EntityName(entry, kind: "clone ID")) != nil else {
            return .ignored("\(clonesDirectory)/\(display) is not a clone's directory: ignored; remove it by hand if it is not yours.")
        }
        if let reason = trustedCloneDirectory(entry) {
            return .ignored("clone directory \(cloneDirectory(display)): \(reason); ignored, never acted on. Check it and remove it by hand.")
        }
        switch StoredJSON.read(CloneRecord.self, at: recordPath(entry), owner: ownerUID) {
        case .success(let record):
            if let reason = record.problem(directoryName: entry, storeRoot: root) {
                return .broken("clone record \(recordPath(display)): \(reason); not believed. 'vmtemplate gc' removes it.")
            }
            return .record(record)
        case .failure(.unreadable(let error)) where error.code == EACCES:
            return .notYours
        case .failure(.missing):
            return .broken("clone directory \(cloneDirectory(display)) has no record; 'vmtemplate gc' removes it.")
        case .failure(let failure):
            return .broken("clone record \(recordPath(display)): \(failure); 'vmtemplate gc' removes it.")
        }
    }

    /// What a listing of `clones/` found.
    public struct CloneListing: Sendable {
        /// Records the store's owner wrote that hold up (oldest first).
        public var records: [CloneRecord] = []
        /// Clones whose records this user may not read (another user's store): their IDs.
        public var notYours: [String] = []
        /// Entries that are not believed, and why: reported, never acted on.
        public var problems: [String] = []
        /// Directories of the owner's without a record that can be used (a `clone` killed before it
        /// wrote one, or a corrupt record): what `gc` cleans up.
        public var broken: [String] = []

        public init() {}
    }

    /// Every clone in the store, each entry checked before it is believed.
    public func listClones() -> CloneListing {
        var listing = CloneListing()
        for entry in StoredJSON.entries(of: clonesDirectory) {
            switch examineClone(entry) {
            case .record(let record):
                listing.records.append(record)
            case .notYours:
                listing.notYours.append(entry)
            case .ignored(let problem):
                listing.problems.append(problem)
            case .broken(let problem):
                listing.problems.append(problem)
                listing.broken.append(entry)
            }
        }
        listing.records.sort { $0.createdAt < $1.createdAt }
        return listing
    }

    /// All clone records the store's owner wrote that hold up, oldest first; what is not believed
    /// goes to `problems`.
    public func clones() -> (records: [CloneRecord], problems: [String]) {
        let listing = listClones()
        return (listing.records, listing.problems)
    }

    /// The shortest ID prefix a lookup accepts (git's shortest abbreviation): a name of one to
    /// three characters is only ever a name.
    public static let minimumIDPrefix = 4

    /// Finds a clone by its full ID or its exact name, never a prefix: what the API takes, where a
    /// caller may name clones and a short prefix could reach one it did not mean.
    public func findCloneExactly(_ reference: String) throws -> CloneRecord {
        if let held = cloneHoldingName(reference) { return held }
        // A store whose name index lacks the entry (made before it, or an entry lost): the records.
        if let record = clones().records.first(where: { $0.id == reference || $0.name == reference }) { return record }
        throw Self.noCloneExactly(reference)
    }

    /// The error for an exact lookup that finds nothing (or nothing this caller may see).
    package static func noCloneExactly(_ reference: String) -> VMTemplateError {
        VMTemplateError(.notFound, "no clone with ID or name '\(TerminalText.escape(reference))' (the API takes a full ID or a name, not a prefix): see GET /v1/clones.")
    }

    /// Finds a clone by its ID, its name, or an unambiguous prefix of its ID (docs/cli.md).
    ///
    /// A full ID always wins (no clone may be named like another's ID). A name that is also the
    /// start of another clone's ID is refused as ambiguous rather than resolved either way: a
    /// caller who may name clones (a member of the API socket's group) could otherwise capture
    /// lookups of another clone by a short prefix.
    public func findClone(_ reference: String) throws -> CloneRecord {
        let shown = TerminalText.escape(reference)
        func refuseIfAlsoPrefix(of named: CloneRecord) throws -> CloneRecord {
            guard reference.utf8.count >= Self.minimumIDPrefix else { return named }
            let others = StoredJSON.entries(of: clonesDirectory).filter { $0 != named.id && $0.hasPrefix(reference) }
            guard others.isEmpty else {
                throw VMTemplateError(.invalidArgument, "'\(shown)' is the name of clone \(named.id) and the start of the ID of clone \(others.joined(separator: ", ")): use a full ID.")
            }
            return named
        }
        // An ID or a name: found through the name index, without reading every record.
        if let held = cloneHoldingName(reference) {
            return held.id == reference ? held : try refuseIfAlsoPrefix(of: held)
        }
        let records = clones().records
        if let exact = records.first(where: { $0.id == reference }) { return exact }
        let named = records.filter { $0.name == reference }
        if named.count == 1 { return try refuseIfAlsoPrefix(of: named[0]) }
        if named.count > 1 {
            throw VMTemplateError(.invalidState, "\(named.count) clones are named '\(shown)' (\(named.map(\.id).joined(separator: ", "))): use an ID.")
        }
        let byPrefix = reference.utf8.count >= Self.minimumIDPrefix ? records.filter { $0.id.hasPrefix(reference) } : []
        if byPrefix.count == 1 { return byPrefix[0] }
        if byPrefix.count > 1 {
            throw VMTemplateError(.invalidArgument, "'\(shown)' matches \(byPrefix.count) clones: give more of the ID.")
        }
        throw VMTemplateError(.notFound, "no clone with ID or name '\(shown)': see 'vmtemplate list'.")
    }
}

extension LockedStore {
    /// Changes one clone's record (read, change, write), so concurrent writers never lose each
    /// other's changes. Returns nil when the clone is gone.
    @discardableResult
    public func updateClone(_ id: String, _ change: (inout CloneRecord) throws -> Void) throws -> CloneRecord? {
        guard store.trustedCloneDirectory(id) == nil else { return nil }
        return try update(CloneRecord.self, at: store.recordPath(id), durable: false, change)
    }
}

/// The files of one clone's directory, `clones/ID/`: the one place that names them. Every path is
/// derived from the store layout and a checked ID, never read from a record.
public struct CloneLayout: Sendable, Equatable {
    public let directory: String

    public init(directory: String) {
        self.directory = directory
    }

    /// QEMU's sockets and logs (named by the QEMU layer, which starts QEMU with them).
    public var instance: InstancePaths { InstancePaths(directory: directory) }
    /// The record (``CloneRecord``).
    public var record: String { "\(directory)/record.json" }
    /// Made exclusively by the one process that removes the clone (``LockedStore/claimRemoval(of:)``).
    public var removalClaim: String { "\(directory)/.removing" }
    /// Held by `device add/rm`, one device operation at a time.
    public var deviceLock: String { "\(directory)/devices.lock" }
    /// What the guest answered to its clock and hostname, or why they were not sent.
    public var guestSetupLog: String { "\(directory)/guest-setup.log" }

    /// The private overlay of an `overlay=on` disk.
    public func overlay(of device: AttachedDevice) -> String { "\(directory)/\(device.overlayFileName)" }
}
