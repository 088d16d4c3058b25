#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// One mapping from `/proc/PID/smaps`: its address range, what it maps, and its memory counters.
package struct SmapsMapping: Sendable, Equatable {
    /// First address of the mapping.
    package var start: UInt64
    /// One past the last address of the mapping.
    package var end: UInt64
    /// Permissions as shown by the kernel, e.g. "rw-p" ("p" private, "s" shared).
    package var permissions: String
    /// Offset into the mapped file.
    package var offset: UInt64
    /// Device of the mapped file, "major:minor" in hex.
    package var device: String
    /// Inode of the mapped file, 0 for anonymous memory.
    package var inode: UInt64
    /// The mapped path or pseudo-path ("[heap]"); nil for anonymous memory.
    ///
    /// May contain spaces; ends with " (deleted)" when the file was unlinked after being mapped.
    package var path: String?
    /// The counters in bytes (the file states kB), keyed by their names: "Rss", "Anonymous", "Swap", ...
    package var fields: [String: UInt64]

    /// Creates a mapping; normally obtained from `Smaps.parse(_:)`.
    package init(
        start: UInt64, end: UInt64, permissions: String, offset: UInt64, device: String = "00:00",
        inode: UInt64, path: String?, fields: [String: UInt64]
    ) {
        self.start = start
        self.end = end
        self.permissions = permissions
        self.offset = offset
        self.device = device
        self.inode = inode
        self.path = path
        self.fields = fields
    }

    /// The mapping's virtual size in bytes.
    package var size: UInt64 { end >= start ? end - start : 0 }
    /// Resident bytes.
    package var rss: UInt64 { fields["Rss"] ?? 0 }
    /// Anonymous bytes; for a private file mapping, the pages written since mapping (copy-on-write copies).
    package var anonymous: UInt64 { fields["Anonymous"] ?? 0 }
    /// Clean pages mapped only by this process (may still be page cache shared with later mappers).
    package var privateClean: UInt64 { fields["Private_Clean"] ?? 0 }
    /// Dirty pages mapped only by this process.
    package var privateDirty: UInt64 { fields["Private_Dirty"] ?? 0 }
    /// Clean pages also mapped by other processes.
    package var sharedClean: UInt64 { fields["Shared_Clean"] ?? 0 }
    /// Dirty pages also mapped by other processes.
    package var sharedDirty: UInt64 { fields["Shared_Dirty"] ?? 0 }
    /// Bytes of this mapping swapped out.
    package var swap: UInt64 { fields["Swap"] ?? 0 }

    /// True if the mapped file was deleted after it was mapped.
    package var isDeletedFile: Bool { path?.hasSuffix(Smaps.deletedSuffix) ?? false }
}

/// Readers and parsers for `/proc/PID/smaps` and `/proc/PID/smaps_rollup`.
package enum Smaps {
    /// What the kernel appends to the path of a mapped file that has since been unlinked.
    package static let deletedSuffix = " (deleted)"

    /// Parses the text of `/proc/PID/smaps`; lines it does not understand are skipped.
    package static func parse(_ text: String) -> [SmapsMapping] {
        var mappings: [SmapsMapping] = []
        var current: SmapsMapping?
        for line in text.split(separator: "\n", omittingEmptySubsequences: true) {
            if let header = parseHeader(line) {
                if let finished = current { mappings.append(finished) }
                current = header
            } else if let (key, bytes) = parseField(line) {
                current?.fields[key] = bytes
            }
        }
        if let finished = current { mappings.append(finished) }
        return mappings
    }

    /// Parses the text of `/proc/PID/smaps_rollup` into its counters in bytes ("Rss", "Anonymous", ...).
    package static func parseRollup(_ text: String) -> [String: UInt64] {
        var fields: [String: UInt64] = [:]
        for line in text.split(separator: "\n") where parseHeader(line) == nil {
            if let (key, bytes) = parseField(line) { fields[key] = bytes }
        }
        return fields
    }

    /// Reads and parses `/proc/PID/smaps`; throws `.notFound` if the process is gone.
    package static func read(pid: Int32) throws -> [SmapsMapping] {
        parse(try readText(pid: pid, name: "smaps"))
    }

    /// Reads and parses `/proc/PID/smaps_rollup`; throws `.notFound` if the process is gone.
    package static func readRollup(pid: Int32) throws -> [String: UInt64] {
        parseRollup(try readText(pid: pid, name: "smaps_rollup"))
    }

    /// What clone accounting needs from smaps: `Anonymous` and `Rss - Anonymous` of the mappings
    /// of one of `templatePaths`, and `Anonymous` and `Swap` of the whole process.
    struct Counters: Equatable {
        var templateAnonymous: UInt64 = 0
        var templateShared: UInt64 = 0
        var totalAnonymous: UInt64 = 0
        var totalSwap: UInt64 = 0
    }

    /// The hot path of `list`, the scheduler and metrics, on the bytes of smaps: with a hundred
    /// clones, splitting the text into Swift strings cost several times the kernel's read.
    static func counters(bytes smaps: [UInt8], templatePaths: [String]) -> Counters {
        let accepted = Set(templatePaths.flatMap { [Array($0.utf8), Array(($0 + deletedSuffix).utf8)] })
        var counters = Counters()
        var inTemplate = false
        var rss: UInt64 = 0
        var anonymous: UInt64 = 0
        func finish() {
            if inTemplate {
                counters.templateAnonymous = saturating(counters.templateAnonymous, anonymous)
                counters.templateShared = saturating(counters.templateShared, rss >= anonymous ? rss - anonymous : 0)
            }
        }
        smaps.withUnsafeBufferPointer { all in
            var lineStart = 0
            while lineStart < all.count {
                var lineEnd = lineStart
                while lineEnd < all.count && all[lineEnd] != 0x0A { lineEnd += 1 }
                defer { lineStart = lineEnd + 1 }
                guard lineEnd > lineStart else { continue }
                let line = UnsafeBufferPointer(rebasing: all[lineStart..<lineEnd])
                // Field lines start with a capitalized key; mapping headers with a hex address.
                let first = line[0]
                if first >= UInt8(ascii: "A") && first <= UInt8(ascii: "Z") {
                    if let bytes = fieldValue(line, key: anonymousKey) {
                        counters.totalAnonymous = saturating(counters.totalAnonymous, bytes)
                        anonymous = bytes
                    } else if let bytes = fieldValue(line, key: swapKey) {
                        counters.totalSwap = saturating(counters.totalSwap, bytes)
                    } else if inTemplate, let bytes = fieldValue(line, key: rssKey) {
                        rss = bytes
                    }
                    continue
                }
                finish()
                rss = 0
                anonymous = 0
                inTemplate = headerPath(line).map { accepted.contains(Array($0)) } ?? false
            }
        }
        finish()
        return counters
    }

    private static func saturating(_ a: UInt64, _ b: UInt64) -> UInt64 {
        let (sum, overflow) = a.addingReportingOverflow(b)
        return overflow ? .max : sum
    }

    private static let anonymousKey = Array("Anonymous:".utf8)
    private static let swapKey = Array("Swap:".utf8)
    private static let rssKey = Array("Rss:".utf8)

    /// "Key:   123 kB" as bytes, when the line has this key; nil otherwise or when malformed.
    private static func fieldValue(_ line: UnsafeBufferPointer<UInt8>, key: [UInt8]) -> UInt64? {
        guard line.count > key.count, line.starts(with: key) else { return nil }
        var index = key.count
        while index < line.count && line[index] == 0x20 { index += 1 }
        var kilobytes: UInt64 = 0
        var digits = 0
        while index < line.count, line[index] >= 0x30, line[index] <= 0x39 {
            let (times, overflow1) = kilobytes.multipliedReportingOverflow(by: 10)
            let (sum, overflow2) = times.addingReportingOverflow(UInt64(line[index] - 0x30))
            kilobytes = overflow1 || overflow2 ? .max : sum
            digits += 1
            index += 1
        }
        guard digits > 0, line.count - index == 3, line[index] == 0x20, line[index + 1] == UInt8(ascii: "k"), line[index + 2] == UInt8(ascii: "B") else { return nil }
        let (bytes, overflow) = kilobytes.multipliedReportingOverflow(by: 1024)
        return overflow ? .max : bytes
    }

    /// The path of a mapping header ("start-end perms offset dev inode   path"): what follows the
    /// fifth field and its padding; nil when there is none. A path may contain spaces.
    private static func headerPath(_ line: UnsafeBufferPointer<UInt8>) -> Slice<UnsafeBufferPointer<UInt8>>? {
        var index = 0
        for _ in 0..<5 {
            while index < line.count && line[index] == 0x20 { index += 1 }
            guard index < line.count else { return nil }
            while index < line.count && line[index] != 0x20 { index += 1 }
        }
        while index < line.count && line[index] == 0x20 { index += 1 }
        return index < line.count ? line[index...] : nil
    }

    static func readText(pid: Int32, name: String) throws -> String {
        String(decoding: try readBytes(pid: pid, name: name), as: UTF8.self)
    }

    /// The most smaps text believed: a QEMU's is 100–300 KiB; one that split its memory into
    /// tens of thousands of mappings (a compromised QEMU) would make every measurement cost the
    /// root process tens of MiB.
    package static let maxBytes = 16 << 20

    static func readBytes(pid: Int32, name: String) throws -> [UInt8] {
        let path = "/proc/\(pid)/\(name)"
        let gone = VMTemplateError(
            .notFound,
            "process \(pid) is gone, so its memory cannot be measured; check whether the clone is still running"
        )
        guard pid > 0 else { throw gone }
        switch FileSystem.readContents(path: path, limit: maxBytes) {
        case .failure(let failure) where failure.code == E2BIG:
            throw VMTemplateError(.limitExceeded, "process \(pid)'s \(name) is larger than \(maxBytes >> 20) MiB: it has split its memory into more mappings than a QEMU makes.", cause: failure)
        case .success(let text):
            // A zombie, or a process that exited between open and read, has an empty smaps.
            guard !text.isEmpty else { throw gone }
            return text
        case .failure(let failure):
            switch failure.code {
            case ENOENT, ESRCH:
                throw gone
            case EACCES, EPERM:
                throw VMTemplateError(
                    .ioError,
                    "cannot read '\(path)': permission denied; run as the user that started the clone, or as root",
                    cause: failure
                )
            default:
                throw VMTemplateError(
                    .ioError,
                    "cannot read '\(path)': \(errnoText(failure.code)); check that /proc is mounted",
                    cause: failure
                )
            }
        }
    }

    /// A mapping header: "start-end perms offset dev inode [path]", the path padded with spaces.
    private static func parseHeader(_ line: Substring) -> SmapsMapping? {
        var rest = line[...]
        func nextToken() -> Substring? {
            rest = rest.drop(while: { $0 == " " })
            guard !rest.isEmpty else { return nil }
            let token = rest.prefix(while: { $0 != " " })
            rest = rest.dropFirst(token.count)
            return token
        }
        guard let range = nextToken(), let dash = range.firstIndex(of: "-"),
              let start = UInt64(range[..<dash], radix: 16),
              let end = UInt64(range[range.index(after: dash)...], radix: 16),
              let permissions = nextToken(), permissions.count == 4,
              let offsetText = nextToken(), let offset = UInt64(offsetText, radix: 16),
              let device = nextToken(), device.contains(":"),
              let inodeText = nextToken(), let inode = UInt64(inodeText)
        else { return nil }
        // Only the padding is stripped: a path may itself contain (even end in) spaces.
        let pathText = rest.drop(while: { $0 == " " })
        return SmapsMapping(
            start: start, end: end, permissions: String(permissions), offset: offset,
            device: String(device), inode: inode, path: pathText.isEmpty ? nil : String(pathText), fields: [:]
        )
    }

    /// A counter line "Name:   123 kB"; lines without a kB value (VmFlags, THPeligible) give nil.
    private static func parseField(_ line: Substring) -> (String, UInt64)? {
        guard let colon = line.firstIndex(of: ":") else { return nil }
        let key = line[..<colon]
        let value = line[line.index(after: colon)...].split(separator: " ")
        guard value.count == 2, value[1] == "kB", let kilobytes = UInt64(value[0]) else { return nil }
        let (bytes, overflow) = kilobytes.multipliedReportingOverflow(by: 1024)
        return (String(key), overflow ? UInt64.max : bytes)
    }
}

/// What one clone costs in memory, separating its own pages from the template pages it shares.
package struct CloneMemoryUsage: Sendable, Codable, Equatable {
    /// Pages of guest RAM the guest has written: private copies of template pages, the clone's own delta.
    package var copyOnWriteBytes: UInt64
    /// Template pages the clone maps from the page cache; shared with the template and other clones, so
    /// not this clone's cost, even though the kernel may count them as Private_Clean.
    package var templateResidentBytes: UInt64
    /// QEMU's own anonymous memory outside guest RAM: heap, TCG translation cache, device state.
    package var qemuPrivateBytes: UInt64
    /// Bytes of the whole process swapped out.
    package var swapBytes: UInt64

    /// Creates a usage record; normally obtained from `measure(pid:templateFile:)`.
    package init(copyOnWriteBytes: UInt64, templateResidentBytes: UInt64, qemuPrivateBytes: UInt64, swapBytes: UInt64) {
        self.copyOnWriteBytes = copyOnWriteBytes
        self.templateResidentBytes = templateResidentBytes
        self.qemuPrivateBytes = qemuPrivateBytes
        self.swapBytes = swapBytes
    }

    /// Memory this clone alone is responsible for: its copy-on-write pages plus QEMU's private memory.
    package var ownBytes: UInt64 {
        copyOnWriteBytes &+ qemuPrivateBytes
    }

    /// Measures the running process `pid` whose guest RAM is a private mapping of `templateFile`.
    ///
    /// Throws `.notFound` if the process is gone.
    package static func measure(pid: Int32, templateFile: String) throws -> CloneMemoryUsage {
        let smaps = try Smaps.readBytes(pid: pid, name: "smaps")
        // The hot path of `list` and the scheduler: one read of smaps (smaps_rollup would walk the
        // page tables a second time), and only the fields this needs are parsed: parsing every
        // field of every mapping costs several times the read itself.
        let counters = Smaps.counters(bytes: smaps, templatePaths: candidatePaths(for: templateFile))
        return CloneMemoryUsage(
            copyOnWriteBytes: counters.templateAnonymous,
            templateResidentBytes: counters.templateShared,
            qemuPrivateBytes: counters.totalAnonymous >= counters.templateAnonymous ? counters.totalAnonymous - counters.templateAnonymous : 0,
            swapBytes: counters.totalSwap
        )
    }

    /// The pure form of `measure(pid:templateFile:)`, taking the text of smaps and smaps_rollup.
    ///
    /// `templatePaths` are the exact paths the template file may appear under (already resolved).
    package static func measure(smaps: String, rollup: String?, templatePaths: [String]) -> CloneMemoryUsage {
        measure(mappings: Smaps.parse(smaps), rollup: rollup.map(Smaps.parseRollup), templatePaths: templatePaths)
    }

    /// Sums the template mappings and subtracts them from the whole-process totals.
    package static func measure(mappings: [SmapsMapping], rollup: [String: UInt64]?, templatePaths: [String]) -> CloneMemoryUsage {
        let accepted = Set(templatePaths.flatMap { [$0, $0 + Smaps.deletedSuffix] })
        var copyOnWrite: UInt64 = 0
        var templateResident: UInt64 = 0
        for mapping in mappings {
            guard let path = mapping.path, accepted.contains(path) else { continue }
            copyOnWrite &+= mapping.anonymous
            templateResident &+= mapping.rss >= mapping.anonymous ? mapping.rss - mapping.anonymous : 0
        }
        let totals = rollup ?? mappings.reduce(into: [String: UInt64]()) { sums, mapping in
            sums["Anonymous", default: 0] &+= mapping.anonymous
            sums["Swap", default: 0] &+= mapping.swap
        }
        let totalAnonymous = totals["Anonymous"] ?? 0
        // smaps and smaps_rollup are separate snapshots of a running process, so clamp instead of wrapping.
        let qemuPrivate = totalAnonymous >= copyOnWrite ? totalAnonymous - copyOnWrite : 0
        return CloneMemoryUsage(
            copyOnWriteBytes: copyOnWrite,
            templateResidentBytes: templateResident,
            qemuPrivateBytes: qemuPrivate,
            swapBytes: totals["Swap"] ?? 0
        )
    }

    /// The path as given, made absolute, and with symlinks resolved: smaps shows the resolved one.
    static func candidatePaths(for templateFile: String) -> [String] {
        var paths = [templateFile]
        if !templateFile.hasPrefix("/") {
            var buffer = [CChar](repeating: 0, count: Int(PATH_MAX) + 1)
            if getcwd(&buffer, buffer.count) != nil {
                let cwd = String(decoding: buffer.prefix(while: { $0 != 0 }).map { UInt8(bitPattern: $0) }, as: UTF8.self)
                paths.append(cwd == "/" ? "/" + templateFile : cwd + "/" + templateFile)
            }
        }
        if let resolved = realpath(templateFile, nil) {
            paths.append(String(cString: resolved))
            free(resolved)
        }
        var seen = Set<String>()
        return paths.filter { seen.insert($0).inserted }
    }
}
