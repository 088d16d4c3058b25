import Foundation
import VMTemplateOS

/// The one way the store reads and writes its JSON files: manifests, clone records, settings and
/// staging owners.
///
/// - Reads tolerate fields they do not know (a newer vmtemplate may add some) and say which file
///   failed and why; a listing skips an unreadable entry and reports it instead of failing whole.
/// - Writes are atomic (a temporary file, fsync, rename), so a reader never sees half a file.
/// - Changes to a file that several processes write go through ``TemplateStore/update(_:at:default:_:)``
///   under the store lock, so nobody loses another's change.
package enum StoredJSON {
    /// Why a file could not be read.
    public enum ReadFailure: Error, Sendable, CustomStringConvertible {
        case missing
        case unreadable(SystemCallError)
        case invalid(String)
        /// Not a regular file of the expected owner (a link, another user's file): not believed.
        case untrusted(String)

        public var description: String {
            switch self {
            case .missing: "it does not exist"
            case .unreadable(let error): "it cannot be read (\(error))"
            case .invalid(let reason): reason.hasPrefix("it ") ? reason : "it is not valid: \(reason)"
            case .untrusted(let reason): "it is not to be believed: \(reason)"
            }
        }
    }

    /// The largest JSON file the store reads (a manifest or record is a few KiB).
    static let maxBytes = 1 << 20

    /// Reads and decodes `path`. With `owner`, the file must be a regular file (a symbolic link is
    /// never followed) owned by that user: anybody else's file is only a claim.
    public static func read<Value: Decodable>(_ type: Value.Type, at path: String, owner: uid_t? = nil) -> Result<Value, ReadFailure> {
        let fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK)
        guard fd >= 0 else {
            let code = errno
            if code == ENOENT || code == ENOTDIR { return .failure(.missing) }
            if code == ELOOP { return .failure(.untrusted("it is a symbolic link")) }
            return .failure(.unreadable(SystemCallError("open", code: code)))
        }
        defer { close(fd) }
        var info = stat()
        guard fstat(fd, &info) == 0 else { return .failure(.unreadable(SystemCallError("fstat"))) }
        guard (info.st_mode & S_IFMT) == S_IFREG else { return .failure(.untrusted("it is not a regular file")) }
        if let owner, info.st_uid != owner {
            return .failure(.untrusted("it belongs to uid \(info.st_uid), not to the store's owner (uid \(owner))"))
        }
        guard info.st_size <= maxBytes else { return .failure(.invalid("it is \(info.st_size) bytes, more than a store file ever is")) }
        let bytes: [UInt8]
        switch FileSystem.readAll(descriptor: fd) {
        case .success(let contents):
            bytes = contents
        case .failure(let error):
            return .failure(.unreadable(error))
        }
        do {
            return .success(try JSONCoding.decoder().decode(Value.self, from: Data(bytes)))
        } catch {
            return .failure(.invalid(JSONErrorText.describe(error)))
        }
    }

    /// Encodes `value` and replaces `path` with it atomically. `durable: false` skips the fsyncs
    /// (for files that die with the machine anyway, such as a running clone's record).
    public static func write(_ value: some Encodable, to path: String, mode: mode_t = 0o644, durable: Bool = true) throws {
        try FileSystem.writeFileAtomically(path: path, data: try JSONCoding.encode(value), mode: mode, durable: durable)
    }

    /// Reads `file` in every entry of `directory` (hidden entries and entries without the file
    /// skipped): the values by entry name, and a sentence for each entry that could not be read.
    public static func readAll<Value: Decodable>(_ type: Value.Type, file: String, in directory: String, owner: uid_t? = nil, what: String) -> (values: [(entry: String, value: Value)], problems: [String]) {
        var values: [(String, Value)] = []
        var problems: [String] = []
        for entry in entries(of: directory) {
            let path = "\(directory)/\(entry)/\(file)"
            switch read(type, at: path, owner: owner) {
            case .success(let value):
                values.append((entry, value))
            case .failure(.missing):
                // An entry being set up has its directory before its file.
                continue
            case .failure(let failure):
                problems.append("\(what) \(path): \(failure)")
            }
        }
        return (values, problems)
    }

    /// The names in `directory`, sorted, without hidden ones (temporary files of atomic writes).
    public static func entries(of directory: String) -> [String] {
        let names = (try? FileManager.default.contentsOfDirectory(atPath: directory)) ?? []
        return names.filter { !$0.hasPrefix(".") }.sorted()
    }
}

extension LockedStore {
    /// Changes the JSON file at `path`: read (or start from `initial` when
    /// the file does not exist; nil: return nil), change, write atomically. Concurrent writers
    /// never lose each other's changes.
    @discardableResult
    public func update<Value: Codable>(_ type: Value.Type, at path: String, default initial: Value? = nil, durable: Bool = true, _ change: (inout Value) throws -> Void) throws -> Value? {
        var value: Value
        switch StoredJSON.read(type, at: path, owner: store.ownerUID) {
        case .success(let current):
            value = current
        case .failure(.missing):
            guard let initial else { return nil }
            value = initial
        case .failure(let failure):
            throw VMTemplateError(.invalidState, "'\(path)' cannot be changed because \(failure): fix or remove it.", cause: failure)
        }
        try change(&value)
        try StoredJSON.write(value, to: path, durable: durable)
        return value
    }
}
