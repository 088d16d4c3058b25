import Foundation
import Testing

@testable import VMTemplateOS
@testable import VMTemplateStore

#if canImport(Glibc)
import Glibc
#endif

/// The store's event journal on its own: positions across processes' appends, rotation, a reader
/// that follows it, and a journal that holds what no vmtemplate wrote.
@Suite("the event journal")
struct EventJournalTests {
    /// A fresh store in /tmp, removed by the caller.
    static func store() throws -> TemplateStore {
        let root = "/tmp/vmtemplate-journal-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        return try TemplateStore(root: root)
    }

    static func line(_ seq: UInt64, _ type: String = "clone.created") -> String {
        #"{"seq":\#(seq),"time":"2026-12-05T12:00:00Z","type":"\#(type)","clone":"0123456789ab","name":"n","template":"t"}"#
    }

    /// Writes `text` into the file as it is (no rename: the same inode), opened with `flags`.
    static func writeInPlace(_ path: String, _ text: String, flags: Int32) {
        let fd = open(path, O_WRONLY | flags)
        _ = text.withCString { Glibc.write(fd, $0, strlen($0)) }
        close(fd)
    }

    /// A journal file of one event line per seq, as vmtemplate writes them.
    static func write(_ path: String, _ seqs: [UInt64]) throws {
        try FileSystem.writeFileAtomically(path: path, data: Array((seqs.map { line($0) }.joined(separator: "\n") + "\n").utf8), mode: 0o600, durable: false)
    }

    @Test("appends get increasing positions; read(after:) gives what follows; an unknown type is kept as unknown")
    func appendAndRead() async throws {
        let store = try Self.store()
        defer { try? FileSystem.removeTree(path: store.root) }
        for _ in 0..<5 {
            try await store.withLock { $0.record(StoreEvent(.templateAdded, template: "t")) }
        }
        let journal = store.events
        #expect(journal.lastSeq() == 5)
        #expect(try journal.read(after: 0).events.map(\.seq) == [1, 2, 3, 4, 5])
        #expect(try journal.read(after: 3).events.map(\.seq) == [4, 5])
        #expect(throws: VMTemplateError.self, "a position past the last event: the journal was started again") { try journal.read(after: 9) }
        var info = stat()
        #expect(stat(journal.currentPath, &info) == 0 && info.st_mode & 0o777 == 0o600, "the journal is the owner's alone")
        try FileSystem.writeFileAtomically(path: journal.currentPath, data: Array((Self.line(1, "clone.teleported") + "\n").utf8), mode: 0o600, durable: false)
        #expect(try journal.read(after: 0).events.map(\.type) == [.unknown])
    }

    @Test("lines that no vmtemplate wrote are skipped: garbage, a seq that goes back, an endless line, a last line without its newline")
    func hostileLines() async throws {
        let store = try Self.store()
        defer { try? FileSystem.removeTree(path: store.root) }
        let journal = store.events
        mkdir(journal.directory, 0o700)
        let long = "{\"seq\":4,\"x\":\"" + String(repeating: "a", count: 20000) + "\"}"
        let text = [Self.line(1), "not json", Self.line(2), Self.line(1), "{}", long, Self.line(5)].joined(separator: "\n") + "\n" + Self.line(6)
        try FileSystem.writeFileAtomically(path: journal.currentPath, data: Array(text.utf8), mode: 0o600, durable: false)
        #expect(try journal.read(after: 0).events.map(\.seq) == [1, 2, 5])
        var tail = EventJournal.Tail(journal, after: 0)
        #expect(tail.next().map(\.seq) == [1, 2, 5])
        // The next append goes after the last complete line it can read.
        try await store.withLock { locked in
            // The half line is completed first, as a writer that was cut short would have left it.
            Self.writeInPlace(journal.currentPath, "\n", flags: O_APPEND)
            locked.record(StoreEvent(.templateRemoved, template: "t"))
        }
        #expect(tail.next().map(\.seq) == [6, 7])
    }

    @Test("rotation: a follower reads across it without a gap; a position rotated away is refused as no longer kept")
    func rotation() throws {
        let store = try Self.store()
        defer { try? FileSystem.removeTree(path: store.root) }
        let journal = store.events
        mkdir(journal.directory, 0o700)
        try Self.write(journal.currentPath, Array(10...12))
        var tail = EventJournal.Tail(journal, after: 10)
        #expect(tail.next().map(\.seq) == [11, 12])
        // 13 lands in the old file just before it is renamed, 14 and 15 in the new one.
        Self.writeInPlace(journal.currentPath, Self.line(13) + "\n", flags: O_APPEND)
        #expect(rename(journal.currentPath, journal.previousPath) == 0)
        try Self.write(journal.currentPath, Array(14...15))
        #expect(tail.next().map(\.seq) == [13, 14, 15])
        #expect(try journal.read(after: 12).events.map(\.seq) == [13, 14, 15])
        #expect(try journal.read(after: 9).events.count == 6, "the first event kept follows at once: nothing was missed")
        #expect(throws: VMTemplateError.self) { try journal.read(after: 5) }
        do {
            _ = try journal.read(after: 5)
        } catch let error as VMTemplateError {
            #expect(error.cause is EventJournal.Expired && error.message.contains("no longer kept"))
        }
        #expect(journal.lastSeq() == 15)
    }

    @Test("a follower that falls behind a rotation that lost events is told (gap), not fed a hole; a seq no vmtemplate writes is not believed; bounds hold in bytes")
    func gapsAndBounds() throws {
        let store = try Self.store()
        defer { try? FileSystem.removeTree(path: store.root) }
        let journal = store.events
        mkdir(journal.directory, 0o700)
        try Self.write(journal.currentPath, [1, 2, 3])
        var tail = EventJournal.Tail(journal, after: 0)
        #expect(tail.next().map(\.seq) == [1, 2, 3] && !tail.gap)
        // Two rotations while the follower slept: 4 to 9 are gone.
        try Self.write(journal.previousPath, [8, 9])
        unlink(journal.currentPath)
        try Self.write(journal.currentPath, [10, 11])
        _ = tail.next()
        #expect(tail.gap, "events 4 to 7 were never handed out")
        // The same inode number for a new, shorter file (numbers are reused once two rotations
        // deleted a file): seen as a new file, and its hole as a hole.
        var sameInode = EventJournal.Tail(journal, after: 9)
        #expect(sameInode.next().map(\.seq) == [10, 11])
        Self.writeInPlace(journal.currentPath, Self.line(20) + "\n", flags: O_TRUNC)
        #expect(sameInode.next().map(\.seq) == [20] && sameInode.gap)
        try Self.write(journal.currentPath, [10, 11])
        // A tail that starts reads the previous file too: nothing after its position is skipped.
        var fresh = EventJournal.Tail(journal, after: 8)
        #expect(fresh.next().map(\.seq) == [9, 10, 11] && !fresh.gap)
        try FileSystem.writeFileAtomically(path: journal.currentPath, data: Array((Self.line(UInt64.max) + "\n").utf8), mode: 0o600, durable: false)
        #expect(journal.lastSeq() == 9, "a seq of UInt64.max is no vmtemplate's: the next append would overflow")
        #expect(TerminalText.prefix("ab\u{e9}\u{e9}\u{1F600}", bytes: 5) == "ab\u{e9}", "whole characters within the bytes")
        #expect(TerminalText.prefix("abc", bytes: 10) == "abc")
    }
}
