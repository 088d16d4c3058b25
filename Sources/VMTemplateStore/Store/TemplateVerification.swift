import Foundation
import VMTemplateOS

/// What `verify` found: each of a template's files hashed again and compared with its manifest.
public struct TemplateVerification: Sendable, Codable {
    public struct FileResult: Sendable, Codable {
        public var name: String
        public var expectedSHA256: String
        /// nil when the file could not be read.
        public var actualSHA256: String?
        public var sizeBytes: UInt64?
        public var ok: Bool
        /// What differs, in words (empty when `ok`).
        public var problems: [String]

        enum CodingKeys: String, CodingKey {
            case name
            case expectedSHA256 = "expected_sha256"
            case actualSHA256 = "actual_sha256"
            case sizeBytes = "size_bytes"
            case ok, problems
        }
    }

    public var template: String
    public var ok: Bool
    public var files: [FileResult]
}

extension TemplateStore {
    /// Hashes every file of template `name` again (SHA-256 of all its bytes: a minute per few GiB)
    /// and compares size, mode and digest with the manifest. `clone` only makes the quick check
    /// (size, mode, inode, modification time); this is the full one.
    public func verify(_ name: EntityName) throws -> TemplateVerification {
        let template = try template(named: name)
        var results: [TemplateVerification.FileResult] = []
        for stored in template.manifest.storedFiles {
            let path = "\(template.directory)/\(stored.name)"
            var result = TemplateVerification.FileResult(name: stored.name, expectedSHA256: stored.sha256, ok: false, problems: [])
            var info = stat()
            if lstat(path, &info) != 0 {
                result.problems.append("missing")
            } else if (info.st_mode & S_IFMT) != S_IFREG {
                result.problems.append("not a regular file")
            } else {
                result.sizeBytes = UInt64(info.st_size)
                if UInt64(info.st_size) != stored.sizeBytes { result.problems.append("size \(info.st_size) instead of \(stored.sizeBytes)") }
                if UInt16(info.st_mode & 0o7777) != stored.mode { result.problems.append("mode \(String(info.st_mode & 0o7777, radix: 8)) instead of \(String(stored.mode, radix: 8))") }
                if info.st_uid != ownerUID { result.problems.append("owned by uid \(info.st_uid), not the store's owner") }
                do {
                    let digest = try FileDigest.sha256(path: path)
                    result.actualSHA256 = digest
                    if digest != stored.sha256 { result.problems.append("content differs (SHA-256)") }
                } catch {
                    result.problems.append("cannot be read: \(error)")
                }
            }
            result.ok = result.problems.isEmpty
            results.append(result)
        }
        return TemplateVerification(template: name.value, ok: results.allSatisfy(\.ok), files: results)
    }

    /// The files of `template` that are not there as regular files (a quick look for `list`, no
    /// hashing): names as in the manifest.
    public func missingFiles(of template: PublishedTemplate) -> [String] {
        template.manifest.storedFiles.compactMap { stored in
            var info = stat()
            let present = lstat("\(template.directory)/\(stored.name)", &info) == 0 && (info.st_mode & S_IFMT) == S_IFREG
            return present ? nil : stored.name
        }
    }

    /// Takes template `name` out of `templates/` under the lock (renamed aside, so no `clone`
    /// starts from it from now on) and removes its files. The caller has dealt with its clones.
    package func removeTemplateFiles(_ name: EntityName) async throws {
        let aside: String = try await withLock { locked in
            let directory = templateFiles(name).directory
            var info = stat()
            guard lstat(directory, &info) == 0 else {
                throw VMTemplateError(.notFound, "no template named '\(name)': see 'vmtemplate list'.")
            }
            let aside = "\(templatesDirectory)/.removing-\(String(UInt32.random(in: 0...UInt32.max), radix: 16))-\(name)"
            guard rename(directory, aside) == 0 else {
                throw VMTemplateError(.ioError, "cannot remove template '\(name)': \(errnoText()).", cause: SystemCallError("rename"))
            }
            try? FileSystem.fsyncDirectory(path: templatesDirectory)
            locked.record(StoreEvent(.templateRemoved, template: name.value))
            return aside
        }
        try FileSystem.removeTree(path: aside)
    }
}
