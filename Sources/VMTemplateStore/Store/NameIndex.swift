import Foundation
import VMTemplateOS

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// Which clone has which name, without reading every record: `names/NAME` holds the ID of the
/// clone named NAME (every clone's ID is entered as a name too, since names and IDs may not
/// collide). Entries are made with `O_EXCL` under the store lock, so a name is taken once.
///
/// The records stay the truth: an entry counts only while `clones/ID/record.json` exists, holds
/// up (``cloneRecord(_:)``) and carries that name or ID; anything else is stale and is replaced.
/// So an entry left by a killed command or a `gc` costs nothing but its replacement. A store
/// made before the index has its entries made from its records once, on first use.
extension TemplateStore {
    var namesDirectory: String { "\(root)/names" }

    /// The error for a clone name that another clone holds.
    package static func nameTaken(_ name: String) -> VMTemplateError {
        VMTemplateError(.exists, "a clone named '\(name)' already exists: pick another --name, or remove it with 'vmtemplate rm \(name)'.")
    }

    /// The clone that holds `name` (a name or an ID), by its entry; nil when none does.
    public func cloneHoldingName(_ name: String) -> CloneRecord? {
        guard (try? EntityName(name, kind: "clone")) != nil, let id = readNameEntry(name),
              let record = cloneRecord(id), record.name == name || record.id == name else { return nil }
        return record
    }

    /// The ID an entry holds; nil for no entry or one that is not the owner's or not an ID.
    func readNameEntry(_ name: String) -> String? {
        let fd = open("\(namesDirectory)/\(name)", O_RDONLY | O_NOFOLLOW | O_CLOEXEC)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        var info = stat()
        guard fstat(fd, &info) == 0, (info.st_mode & S_IFMT) == S_IFREG, info.st_uid == ownerUID else { return nil }
        var buffer = [UInt8](repeating: 0, count: 64)
        let count = read(fd, &buffer, buffer.count)
        guard count > 0 else { return nil }
        let id = String(decoding: buffer[0..<count], as: UTF8.self)
        return (try? EntityName(id, kind: "clone ID")) != nil ? id : nil
    }

}

/// The name index under the store lock: names are taken and given up only there.
extension LockedStore {
    /// Enters `record`'s name and ID. Throws `.exists` when another
    /// live entry holds either.
    public func claimNames(of record: CloneRecord) throws {
        try ensureNameIndex()
        for name in Set([record.name, record.id]) {
            try claimName(name, for: record.id)
        }
    }

    /// Removes `record`'s entries (those that still point at it).
    public func releaseNames(of record: CloneRecord) {
        for name in Set([record.name, record.id]) where store.readNameEntry(name) == record.id {
            unlink("\(store.namesDirectory)/\(name)")
        }
    }

    private func claimName(_ name: String, for id: String) throws {
        guard (try? EntityName(name, kind: "clone")) != nil else {
            throw VMTemplateError(.invalidArgument, "'\(TerminalText.escape(name))' is not a valid clone name.")
        }
        let path = "\(store.namesDirectory)/\(name)"
        for _ in 0..<2 {
            let fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0o644)
            if fd >= 0 {
                defer { close(fd) }
                let bytes = Array(id.utf8)
                guard write(fd, bytes, bytes.count) == bytes.count else {
                    unlink(path)
                    throw VMTemplateError(.ioError, "cannot write '\(path)': \(errnoText()).")
                }
                return
            }
            guard errno == EEXIST else {
                throw VMTemplateError(.ioError, "cannot create '\(path)': \(errnoText()). Check that this user may write to '\(store.namesDirectory)'.", cause: SystemCallError("open"))
            }
            if let holder = store.readNameEntry(name) {
                if holder == id { return }
                let record = store.cloneRecord(holder)
                // A clone whose directory is there but whose record cannot be read now keeps its
                // name: only a clone that is gone, or renamed, gives it up.
                let taken = record.map { $0.name == name || $0.id == name } ?? (access(store.cloneDirectory(holder), F_OK) == 0)
                if taken { throw TemplateStore.nameTaken(name) }
            }
            // Stale: its clone is gone or renamed.
            unlink(path)
        }
        throw VMTemplateError(.busy, "the name '\(name)' could not be taken: try again.")
    }

    /// Removes entries whose clone is gone (its directory removed by a `gc` that could not read
    /// its record, or by a command killed between the two) or renamed.:
    /// a clone's directory exists before its names are entered, so an entry without one is
    /// stale. Returns the paths removed.
    public func pruneNameIndex() -> [String] {
        var removed: [String] = []
        for name in StoredJSON.entries(of: store.namesDirectory) {
            let path = "\(store.namesDirectory)/\(name)"
            var info = stat()
            guard lstat(path, &info) == 0, (info.st_mode & S_IFMT) == S_IFREG, info.st_uid == store.ownerUID else { continue }
            let stale: Bool
            if let holder = store.readNameEntry(name) {
                if access(store.cloneDirectory(holder), F_OK) != 0 {
                    stale = errno == ENOENT
                } else if let record = store.cloneRecord(holder) {
                    stale = record.name != name && record.id != name
                } else {
                    stale = false
                }
            } else {
                // Empty or not an ID: never written whole (a command killed mid-write).
                stale = true
            }
            if stale && unlink(path) == 0 { removed.append(path) }
        }
        return removed
    }

    /// Makes `names/` and enters every clone's name and ID, once per store.
    private func ensureNameIndex() throws {
        var info = stat()
        if lstat(store.namesDirectory, &info) == 0 {
            guard (info.st_mode & S_IFMT) == S_IFDIR, info.st_uid == store.ownerUID else {
                throw VMTemplateError(.invalidState, "'\(store.namesDirectory)' is not a directory of the store's owner: remove it (a fresh one is made from the records).")
            }
            return
        }
        let building = "\(store.namesDirectory).new-\(getpid())"
        try? FileSystem.removeTree(path: building)
        guard mkdir(building, 0o755) == 0 else {
            throw VMTemplateError(.ioError, "cannot create '\(building)': \(errnoText()).", cause: SystemCallError("mkdir"))
        }
        for record in store.clones().records {
            for name in Set([record.name, record.id]) {
                let fd = open("\(building)/\(name)", O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0o644)
                guard fd >= 0 else { continue }
                _ = write(fd, Array(record.id.utf8), record.id.utf8.count)
                close(fd)
            }
        }
        guard rename(building, store.namesDirectory) == 0 else {
            try? FileSystem.removeTree(path: building)
            throw VMTemplateError(.ioError, "cannot create '\(store.namesDirectory)': \(errnoText()).", cause: SystemCallError("rename"))
        }
    }
}
