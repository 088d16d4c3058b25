import Foundation
import VMTemplateKit
import VMTemplateOS
import VMTemplateQEMU
import VMTemplateStore

/// What one VM's QEMU process holds privately, split into guest RAM and QEMU's own memory, and
/// QEMU's own memory split into what it is made of.
struct MemoryReport: Codable, Sendable {
    /// Anonymous memory of the whole process (smaps_rollup).
    var totalAnonymousBytes: Double
    /// Guest RAM the process holds privately: a clone's copy-on-write pages, a cold VM's RAM.
    var guestBytes: Double
    /// Everything else: heap, TCG translation cache, device RAM blocks, relocated library data...
    var qemuOwnBytes: Double
    /// QEMU's own memory by kind, largest first.
    var breakdown: [Part]
    /// The largest single mappings of QEMU's own memory.
    var largestMappings: [Mapping]
    /// Whether the kernel may give this process transparent huge pages (`THP_enabled` in
    /// /proc/PID/status; off after `prctl(PR_SET_THP_DISABLE)`), nil where the kernel does not say.
    var transparentHugePages: Bool?

    struct Part: Codable, Sendable {
        var kind: String
        var bytes: Double
    }

    struct Mapping: Codable, Sendable {
        var kind: String
        var permissions: String
        var sizeBytes: Double
        var anonymousBytes: Double
        var hugePageBytes: Double
        var path: String?

        enum CodingKeys: String, CodingKey {
            case kind, permissions
            case sizeBytes = "size_bytes"
            case anonymousBytes = "anonymous_bytes"
            case hugePageBytes = "huge_page_bytes"
            case path
        }
    }

    enum CodingKeys: String, CodingKey {
        case totalAnonymousBytes = "total_anonymous_bytes"
        case guestBytes = "guest_bytes"
        case qemuOwnBytes = "qemu_own_bytes"
        case breakdown
        case largestMappings = "largest_mappings"
        case transparentHugePages = "thp_enabled"
    }

    static func transparentHugePages(pid: Int32) -> Bool? {
        guard let status = try? String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8),
              let line = status.split(separator: "\n").first(where: { $0.hasPrefix("THP_enabled:") })
        else { return nil }
        return line.hasSuffix("1")
    }

    /// A clone: guest RAM is the private mapping of the template file, and QEMU's own memory is
    /// `CloneMemoryUsage.qemuPrivateBytes`, the figure `vmtemplate list` shows.
    static func clone(pid: Int32, templateFile: String) throws -> MemoryReport {
        let usage = try CloneMemoryUsage.measure(pid: pid, templateFile: templateFile)
        let mappings = try Smaps.read(pid: pid)
        var report = classify(mappings, isGuestRAM: { $0.path == templateFile || $0.path == templateFile + Smaps.deletedSuffix })
        report.guestBytes = Double(usage.copyOnWriteBytes)
        report.qemuOwnBytes = Double(usage.qemuPrivateBytes)
        report.totalAnonymousBytes = Double(usage.copyOnWriteBytes + usage.qemuPrivateBytes)
        report.transparentHugePages = transparentHugePages(pid: pid)
        return report
    }

    /// An ordinary VM with `memory-backend-ram`: guest RAM is the anonymous mapping at least as
    /// large as the guest's memory that is not executable (the TCG buffer is).
    static func coldVM(pid: Int32, guestMemoryBytes: UInt64) throws -> MemoryReport {
        let mappings = try Smaps.read(pid: pid)
        let rollup = try Smaps.readRollup(pid: pid)
        var report = classify(mappings, isGuestRAM: { $0.path == nil && $0.size >= guestMemoryBytes && !$0.permissions.contains("x") })
        let total = Double(rollup["Anonymous"] ?? 0)
        report.totalAnonymousBytes = total
        report.qemuOwnBytes = Swift.max(0, total - report.guestBytes)
        report.transparentHugePages = transparentHugePages(pid: pid)
        return report
    }

    /// Labels each mapping by what the address space around it says it is. Heuristics, checked
    /// against QEMU 10 on x86-64 glibc:
    /// - `[heap]`: glibc's main malloc arena;
    /// - anonymous and executable: the TCG translation cache (one rwx mapping of `tb-size`);
    /// - anonymous, 64 MiB-aligned, followed by its PROT_NONE rest: a glibc per-thread arena;
    /// - anonymous, 2 MiB-aligned, followed by a PROT_NONE guard page: a QEMU RAM block other than
    ///   guest RAM (BIOS, option ROMs, ACPI tables; QEMU asks for huge pages on these);
    /// - anonymous, right after a PROT_NONE guard: a thread or coroutine stack;
    /// - anonymous pages inside a file mapping: the relocated or written data of QEMU's binary
    ///   and its ~100 shared libraries (.data, .data.rel.ro after relocation, .bss-adjacent).
    static func classify(_ mappings: [SmapsMapping], isGuestRAM: (SmapsMapping) -> Bool) -> MemoryReport {
        var parts: [String: Double] = [:]
        var largest: [Mapping] = []
        var guest: Double = 0
        for (index, mapping) in mappings.enumerated() where mapping.anonymous > 0 {
            if isGuestRAM(mapping) {
                guest += Double(mapping.anonymous)
                continue
            }
            let previous = index > 0 ? mappings[index - 1] : nil
            let next = index + 1 < mappings.count ? mappings[index + 1] : nil
            let kind = kind(of: mapping, previous: previous, next: next)
            parts[kind, default: 0] += Double(mapping.anonymous)
            largest.append(Mapping(kind: kind, permissions: mapping.permissions, sizeBytes: Double(mapping.size), anonymousBytes: Double(mapping.anonymous), hugePageBytes: Double(mapping.fields["AnonHugePages"] ?? 0), path: mapping.path))
        }
        largest.sort { $0.anonymousBytes > $1.anonymousBytes }
        return MemoryReport(
            totalAnonymousBytes: guest + parts.values.reduce(0, +),
            guestBytes: guest,
            qemuOwnBytes: parts.values.reduce(0, +),
            breakdown: parts.map { Part(kind: $0.key, bytes: $0.value) }.sorted { $0.bytes > $1.bytes },
            largestMappings: Array(largest.prefix(10)),
            transparentHugePages: nil
        )
    }

    private static let mebibyte: UInt64 = 1 << 20

    private static func kind(of mapping: SmapsMapping, previous: SmapsMapping?, next: SmapsMapping?) -> String {
        if mapping.path == "[heap]" { return "heap (main malloc arena)" }
        if mapping.path == "[stack]" { return "stacks" }
        if let path = mapping.path, !path.hasPrefix("[") { return "binary and library data" }
        if mapping.path != nil { return "other anonymous" }
        if mapping.permissions.contains("x") { return "TCG translation cache" }
        let guardAfter = next.map { $0.start == mapping.end && $0.permissions.hasPrefix("---") && $0.path == nil } ?? false
        let guardBefore = previous.map { $0.end == mapping.start && $0.permissions.hasPrefix("---") && $0.path == nil } ?? false
        if guardAfter, mapping.start % (64 * mebibyte) == 0, let next, mapping.size + next.size <= 64 * mebibyte {
            return "malloc thread arenas"
        }
        if guardAfter, mapping.start % (2 * mebibyte) == 0, let next, next.size == 4096 { return "device RAM blocks (BIOS, ROMs, ACPI)" }
        if guardBefore { return "stacks" }
        return "other anonymous"
    }
}
