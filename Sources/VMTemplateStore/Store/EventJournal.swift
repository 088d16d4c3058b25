import Foundation
import VMTemplateOS

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// What happened in the store: one line of its event journal (``EventJournal``), one object of
/// `GET /v1/events` and of `vmtemplate events`.
public struct StoreEvent: Sendable, Codable, Equatable {
    /// What happened. The names are the API's: a runtime switches on them.
    public enum Kind: String, Sendable, Codable, CaseIterable {
        case cloneCreated = "clone.created"
        case cloneRunning = "clone.running"
        case cloneDevicesReady = "clone.devices-ready"
        case cloneDeviceAdded = "clone.device-added"
        case cloneDeviceRemoved = "clone.device-removed"
        case clonePaused = "clone.paused"
        case cloneResumed = "clone.resumed"
        case cloneExited = "clone.exited"
        case cloneRemoved = "clone.removed"
        case poolMemberReady = "pool.member-ready"
        case poolMemberRemoved = "pool.member-removed"
        case templateAdded = "template.added"
        case templateRemoved = "template.removed"
        /// A template asked for through the API could not be made (`reason`).
        case templateFailed = "template.failed"
        /// A kind this version does not know (a newer vmtemplate wrote it): shown, never acted on.
        case unknown

        public init(from decoder: any Decoder) throws {
            self = Kind(rawValue: try decoder.singleValueContainer().decode(String.self)) ?? .unknown
        }
    }

    /// The event's position in the store's journal: increasing by one, never reused. A reader
    /// resumes after the last one it saw.
    public var seq: UInt64
    public var time: Date
    public var type: Kind
    /// The clone's ID and name (clone and pool events).
    public var clone: String?
    public var name: String?
    public var template: String?
    /// A clone handed out from its template's warm pool.
    public var fromPool: Bool?
    /// Why: `user` or `scheduler` for a pause; `removed`, `retention`, `failed-start`,
    /// `template-removed` or `gc` for a removal; how a clone's QEMU ended for an exit.
    public var reason: String?
    /// An exited clone's QEMU: its exit status or the signal that killed it (known when this
    /// process started it), and the last lines of its log.
    public var exitStatus: Int32?
    public var signal: Int32?
    public var lastWords: String?
    /// A pause over the copy-on-write limit: the clone's copy-on-write and its limit.
    public var cowBytes: UInt64?
    public var limitBytes: UInt64?
    /// The devices a `clone.devices-ready` is about (their IDs).
    public var devices: [String]?

    public init(_ type: Kind, clone: String? = nil, name: String? = nil, template: String? = nil, reason: String? = nil) {
        seq = 0
        time = Date()
        self.type = type
        self.clone = clone
        self.name = name
        self.template = template
        self.reason = reason
    }

    /// An event about clone `record`.
    public init(_ type: Kind, of record: CloneRecord, reason: String? = nil) {
        self.init(type, clone: record.id, name: record.name, template: record.template, reason: reason)
        if record.fromPool == true, type == .cloneCreated || type == .cloneRunning { fromPool = true }
    }

    enum CodingKeys: String, CodingKey {
        case seq, time, type, clone, name, template, reason, signal, devices
        case fromPool = "from_pool"
        case exitStatus = "exit_status"
        case lastWords = "last_words"
        case cowBytes = "cow_bytes"
        case limitBytes = "limit_bytes"
    }
}

/// The store's event journal, `ROOT/events/`: one JSON object per line, appended under the store
/// lock by whichever process changed the store (a CLI command, `serve`, its scheduler), so the
/// order is the store's own and nothing is lost while no server runs.
///
/// `events.ndjson` grows to ``maxFileBytes``, then becomes `events.1.ndjson` (replacing the one
/// before): the journal keeps the last 4–8 MiB, some 20,000 events. Readers take nothing on
/// trust: a line over ``maxLineBytes``, one that does not decode, or one whose `seq` does not
/// increase is skipped.
public struct EventJournal: Sendable {
    public let directory: String
    let ownerUID: uid_t

    /// The largest position believed: a line claiming more is no vmtemplate's (and its successor
    /// would not fit).
    static let maxSeq = UInt64(Int64.max)
    /// The size at which the journal file is rotated.
    public static let maxFileBytes = 4 << 20
    /// The longest line read (an event is a few hundred bytes).
    static let maxLineBytes = 16 << 10

    public var currentPath: String { "\(directory)/events.ndjson" }
    public var previousPath: String { "\(directory)/events.1.ndjson" }

    init(directory: String, ownerUID: uid_t) {
        self.directory = directory
        self.ownerUID = ownerUID
    }

    /// What a read found.
    public struct Reading: Sendable {
        /// The events after the position asked for, oldest first.
        public var events: [StoreEvent] = []
        /// The first event the journal still holds (nil: it is empty).
        public var firstSeq: UInt64?
        /// The last event the journal holds (0: none yet).
        public var lastSeq: UInt64 = 0
        /// The current file as read: its inode and the bytes up to its last complete line, where a
        /// ``Tail`` that goes on from this reading starts.
        var current: (inode: ino_t, offset: off_t)?
    }

    /// The events after `after` (0: every event kept). Throws `gone` when events after `after`
    /// were already rotated away: the caller has missed some and must list the store again.
    public func read(after: UInt64) throws -> Reading {
        var reading = Reading()
        // Read again when the journal rotated meanwhile: the file read first would have been
        // renamed between the two reads, and its events missed.
        for _ in 0..<4 {
            reading = Reading()
            let before = Self.inode(of: currentPath)
            for path in [previousPath, currentPath] {
                guard let (bytes, inode) = Self.contents(of: path, owner: ownerUID) else { continue }
                if path == currentPath {
                    reading.current = (inode, off_t(bytes.lastIndex(of: UInt8(ascii: "\n")).map { $0 + 1 } ?? 0))
                }
                for event in Self.events(in: bytes[...]) where event.seq > reading.lastSeq {
                    if reading.firstSeq == nil { reading.firstSeq = event.seq }
                    reading.lastSeq = event.seq
                    if event.seq > after { reading.events.append(event) }
                }
            }
            if Self.inode(of: currentPath) == before { break }
        }
        if after > 0, let first = reading.firstSeq, after + 1 < first {
            throw VMTemplateError(.notFound, "events \(after + 1) to \(first - 1) are no longer kept (the journal holds \(first) to \(reading.lastSeq)): list the clones again (GET /v1/clones), then follow from \(reading.lastSeq).", cause: Expired())
        }
        // A position past the last event: the journal was started again (its directory removed).
        if after > reading.lastSeq {
            throw VMTemplateError(.notFound, "event \(after) is past the journal's last (\(reading.lastSeq)): the journal was started again; list the clones again (GET /v1/clones), then follow from \(reading.lastSeq).", cause: Expired())
        }
        return reading
    }

    static func inode(of path: String) -> ino_t? {
        var info = stat()
        return lstat(path, &info) == 0 ? info.st_ino : nil
    }

    /// The cause of the error ``read(after:)`` throws for a position no longer kept: the API
    /// answers it `410 Gone`.
    public struct Expired: Error, Sendable, CustomStringConvertible {
        public var description: String { "" }
    }

    /// The last event's position (0: none yet).
    public func lastSeq() -> UInt64 {
        for path in [currentPath, previousPath] {
            if let seq = Self.lastSeq(in: path, owner: ownerUID) { return seq }
        }
        return 0
    }

    /// Reads what is appended to the journal after a position, without reading it all again:
    /// follows the current file by offset, and through a rotation (the rest of the old file is
    /// then read from its new name).
    public struct Tail: Sendable {
        let journal: EventJournal
        /// The last event handed out.
        public private(set) var lastSeq: UInt64
        /// Set once an event was found missing between two handed out (the journal rotated past a
        /// reader that fell behind): the reader must read again from its position, or list.
        public private(set) var gap = false
        private var inode: ino_t = 0
        private var offset: off_t = 0
        private var partial: [UInt8] = []

        /// A tail that hands out the events after `after`.
        public init(_ journal: EventJournal, after: UInt64) {
            self.journal = journal
            lastSeq = after
        }

        /// A tail that goes on where `reading` ended, without reading the journal again: the
        /// events after the later of `after` and the reading's last.
        public init(_ journal: EventJournal, after: UInt64, continuing reading: Reading) {
            self.init(journal, after: max(after, reading.lastSeq))
            if let current = reading.current {
                inode = current.inode
                offset = current.offset
            }
        }

        /// The events appended since the last call, oldest first (at most about 1 MiB of them).
        public mutating func next() -> [StoreEvent] {
            var info = stat()
            guard lstat(journal.currentPath, &info) == 0 else { return [] }
            var events: [StoreEvent] = []
            // A new file, or one shorter than what was read of it: an inode number can be reused
            // once two rotations have deleted the file it named.
            if info.st_ino != inode || info.st_size < offset {
                if inode != 0 {
                    // Rotated: what was appended to the old file before it was renamed is read first.
                    events += drain(journal.previousPath)
                } else if let (bytes, _) = EventJournal.contents(of: journal.previousPath, owner: journal.ownerUID) {
                    // The first call: the previous file may hold events after the position too.
                    events += EventJournal.events(in: bytes[...])
                }
                inode = info.st_ino
                offset = 0
                partial = []
            }
            events += drain(journal.currentPath)
            let fresh = events.filter { $0.seq > lastSeq }
            if let first = fresh.first, first.seq != lastSeq + 1 { gap = true }
            if let last = fresh.last { lastSeq = last.seq }
            return fresh
        }

        /// Every complete line appended to `path` since the offset, 1 MiB at a time, at most a
        /// journal file's worth.
        private mutating func drain(_ path: String) -> [StoreEvent] {
            var events: [StoreEvent] = []
            for _ in 0..<8 {
                let before = offset
                events += read(path)
                if offset == before { break }
            }
            return events
        }

        /// Complete lines of file `path` (it must still be the file followed) from the offset on.
        private mutating func read(_ path: String) -> [StoreEvent] {
            guard let (fd, info) = EventJournal.openOwned(path, owner: journal.ownerUID) else { return [] }
            defer { close(fd) }
            guard info.st_ino == inode, info.st_size > offset else { return [] }
            let length = min(Int(info.st_size - offset), 1 << 20)
            var chunk = [UInt8](repeating: 0, count: length)
            let count = chunk.withUnsafeMutableBytes { pread(fd, $0.baseAddress, length, offset) }
            guard count > 0 else { return [] }
            offset += off_t(count)
            partial += chunk[0..<count]
            guard let lastNewline = partial.lastIndex(of: UInt8(ascii: "\n")) else {
                // A line longer than any event is dropped, not buffered without end.
                if partial.count > EventJournal.maxLineBytes { partial = [] }
                return []
            }
            let events = EventJournal.events(in: partial[...lastNewline])
            partial = Array(partial[(lastNewline + 1)...])
            return events
        }
    }

    /// A journal file opened for reading, with its status, if it is a regular file (never
    /// reached through a link) of the store's owner: anybody else's file is not the journal.
    static func openOwned(_ path: String, owner: uid_t) -> (fd: Int32, info: stat)? {
        let fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK)
        guard fd >= 0 else { return nil }
        var info = stat()
        guard fstat(fd, &info) == 0, (info.st_mode & S_IFMT) == S_IFREG, info.st_uid == owner else {
            close(fd)
            return nil
        }
        return (fd, info)
    }

    /// The file's bytes and inode, if it is a journal file (``openOwned(_:owner:)``) no larger than a
    /// journal file may grow (a line more than ``maxFileBytes``).
    static func contents(of path: String, owner: uid_t) -> (bytes: [UInt8], inode: ino_t)? {
        guard let (fd, info) = openOwned(path, owner: owner) else { return nil }
        defer { close(fd) }
        guard info.st_size <= maxFileBytes + maxLineBytes * 4,
              case .success(let bytes) = FileSystem.readAll(descriptor: fd) else { return nil }
        return (bytes, info.st_ino)
    }

    /// The events in `bytes`, in order; a line that is too long, does not decode or does not
    /// follow its predecessor's `seq` is skipped. A last line without its newline is not read.
    static func events(in bytes: ArraySlice<UInt8>) -> [StoreEvent] {
        let decoder = JSONCoding.decoder()
        var events: [StoreEvent] = []
        var start = bytes.startIndex
        while let end = bytes[start...].firstIndex(of: UInt8(ascii: "\n")) {
            defer { start = end + 1 }
            guard end - start <= maxLineBytes, end > start,
                  let event = try? decoder.decode(StoreEvent.self, from: Data(bytes[start..<end])),
                  event.seq > (events.last?.seq ?? 0), event.seq <= maxSeq else { continue }
            events.append(event)
        }
        return events
    }

    /// The `seq` of the file's last complete line, read from its tail.
    static func lastSeq(in path: String, owner: uid_t) -> UInt64? {
        guard let (fd, info) = openOwned(path, owner: owner) else { return nil }
        defer { close(fd) }
        guard info.st_size > 0 else { return nil }
        let length = min(Int(info.st_size), maxLineBytes + 1)
        var tail = [UInt8](repeating: 0, count: length)
        let read = tail.withUnsafeMutableBytes { pread(fd, $0.baseAddress, length, off_t(info.st_size) - off_t(length)) }
        guard read == length else { return nil }
        // The tail holds the last line whole (one is at most maxLineBytes): the last event in it.
        let lines = tail.split(separator: UInt8(ascii: "\n"), omittingEmptySubsequences: true)
        let decoder = JSONCoding.decoder()
        for line in lines.reversed() {
            if let event = try? decoder.decode(StoreEvent.self, from: Data(line)), event.seq <= maxSeq { return event.seq }
        }
        return nil
    }
}

extension TemplateStore {
    /// The store's event journal.
    public var events: EventJournal { EventJournal(directory: "\(root)/events", ownerUID: ownerUID) }
}

extension LockedStore {
    /// Appends `event` to the journal with the next position. Under the store lock, so positions
    /// are unique and in order across processes. An event that cannot be written (a full disk)
    /// is dropped, never failing the change it reports: the change is in the records either way.
    @discardableResult
    public func record(_ event: StoreEvent) -> StoreEvent? {
        let journal = store.events
        var event = event
        guard mkdir(journal.directory, 0o700) == 0 || errno == EEXIST else { return nil }
        var info = stat()
        guard lstat(journal.directory, &info) == 0, (info.st_mode & S_IFMT) == S_IFDIR, info.st_uid == store.ownerUID else { return nil }
        event.seq = journal.lastSeq() + 1
        event.time = Date()
        guard let text = try? JSONCoding.line(event), text.utf8.count < EventJournal.maxLineBytes else { return nil }
        let line = Array((text + "\n").utf8)
        if lstat(journal.currentPath, &info) == 0, info.st_size >= EventJournal.maxFileBytes {
            _ = rename(journal.currentPath, journal.previousPath)
        }
        let fd = open(journal.currentPath, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0o600)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        guard fstat(fd, &info) == 0, (info.st_mode & S_IFMT) == S_IFREG, info.st_uid == store.ownerUID else { return nil }
        let written = line.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
        guard written == line.count else {
            // Half a line would spoil the next one too: taken back.
            _ = ftruncate(fd, info.st_size)
            return nil
        }
        return event
    }
}
