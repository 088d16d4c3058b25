#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
import Foundation
import Testing

@testable import VMTemplateOS

/// A fresh directory under /tmp, removed by the caller with `FileSystem.removeTree`.
private func makeTemporaryDirectory(_ label: String) throws -> String {
    let path = "/tmp/vmtemplate-host-tests-\(label)-\(getpid())-\(UUID().uuidString)"
    try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: false)
    return path
}

private func fileMode(_ path: String) -> mode_t? {
    var info = stat()
    guard lstat(path, &info) == 0 else { return nil }
    return info.st_mode & 0o7777
}

private func exists(_ path: String) -> Bool {
    var info = stat()
    return lstat(path, &info) == 0
}

// MARK: - ProcessStat and ProcessIdentity

@Suite("ProcessStat and ProcessIdentity")
struct ProcessStatTests {
    static let plainStat = "11250 (cat) R 11233 11233 10535 0 -1 4194304 98 0 0 0 0 0 0 0 20 0 1 0 24325 3133440 410 18446744073709551615 94297840558080 94297840577961 140725367388832 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0 94297840593968 94297840595584 94298274238464 140725367396864 140725367396884 140725367396884 140725367398379 0\n"

    @Test("parses pid, state, start time (field 22) and comm")
    func parsesPlainStat() throws {
        let stat = try #require(ProcessStat.parse(Self.plainStat))
        #expect(stat == ProcessStat(pid: 11250, state: "R", startTimeTicks: 24325, comm: "cat"))
    }

    @Test("parses a comm containing spaces and parentheses by splitting on the last ')'")
    func parsesHostileComm() throws {
        let text = "4242 (qemu (x) ) S y) Z 1 4242 4242 0 -1 4194560 2131 0 0 0 31 12 0 0 20 0 5 0 987654321 1234567 890 18446744073709551615 1 1 0 0 0 0 0 4096 0 0 0 0 17 0 0 0 0 0 0"
        let stat = try #require(ProcessStat.parse(text))
        #expect(stat.pid == 4242)
        #expect(stat.comm == "qemu (x) ) S y")
        #expect(stat.state == "Z")
        #expect(stat.startTimeTicks == 987_654_321)
        #expect(stat.cpuTicks == 31 + 12)
        #expect(stat.isDefunct)
    }

    @Test("returns nil for malformed stat text", arguments: ["", "garbage", "12 (x) R 1 2 3", "x (cat) R 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19"])
    func rejectsMalformed(text: String) {
        #expect(ProcessStat.parse(text) == nil)
    }

    @Test("reads this process from /proc")
    func readsSelf() throws {
        let stat = try #require(ProcessStat.read(pid: getpid()))
        #expect(stat.pid == getpid())
        #expect(stat.startTimeTicks > 0)
        #expect(!stat.isDefunct)
    }

    @Test("returns nil for a process that does not exist", arguments: [Int32(0x3FFF_FFFF), 0, -5])
    func readsMissing(pid: Int32) {
        #expect(ProcessStat.read(pid: pid) == nil)
        #expect(ProcessIdentity.current(pid: pid) == nil)
        #expect(!ProcessIdentity(pid: pid, startTime: 1).isAlive)
    }

    @Test("an identity is alive only with the same start time")
    func identityMatchesStartTime() throws {
        let me = try #require(ProcessIdentity.current(pid: getpid()))
        #expect(me.isAlive)
        #expect(!ProcessIdentity(pid: me.pid, startTime: me.startTime + 1).isAlive)
        #expect(!ProcessIdentity(pid: me.pid, startTime: me.startTime - 1).isAlive)
    }

    @Test("a reused pid, a zombie or a dead process is not alive")
    func identityDecision() {
        let identity = ProcessIdentity(pid: 77, startTime: 500)
        #expect(identity.isAlive(given: ProcessStat(pid: 77, state: "S", startTimeTicks: 500, comm: "qemu")))
        #expect(identity.isAlive(given: ProcessStat(pid: 77, state: "D", startTimeTicks: 500, comm: "qemu")))
        #expect(!identity.isAlive(given: ProcessStat(pid: 77, state: "S", startTimeTicks: 501, comm: "qemu")))
        #expect(!identity.isAlive(given: ProcessStat(pid: 77, state: "Z", startTimeTicks: 500, comm: "qemu")))
        #expect(!identity.isAlive(given: ProcessStat(pid: 77, state: "X", startTimeTicks: 500, comm: "qemu")))
        #expect(!identity.isAlive(given: nil))
    }

    @Test("a real child is alive while running, not alive as a zombie, and gone once reaped")
    func realZombie() async throws {
        var pid: pid_t = 0
        let arguments = ["/bin/sleep", "0.5"]
        var argv: [UnsafeMutablePointer<CChar>?] = arguments.map { strdup($0) } + [nil]
        defer { for pointer in argv { free(pointer) } }
        let spawned = posix_spawn(&pid, arguments[0], nil, nil, &argv, environ)
        try #require(spawned == 0)

        let identity = try #require(ProcessIdentity.current(pid: pid))
        #expect(identity.isAlive)

        var sawZombie = false
        for _ in 0..<200 {
            if ProcessStat.read(pid: pid)?.state == "Z" {
                sawZombie = true
                break
            }
            try await Task.sleep(nanoseconds: 25_000_000)
        }
        #expect(sawZombie)
        #expect(!identity.isAlive)

        var status: Int32 = 0
        #expect(waitpid(pid, &status, 0) == pid)
        #expect(ProcessStat.read(pid: pid) == nil)
        #expect(!identity.isAlive)
    }

    @Test("parses btime from /proc/stat text")
    func parsesBootTime() {
        let text = "cpu  10 0 20 30 0 0 0 0 0 0\nintr 1 2 3\nctxt 4\nbtime 1795582109\nprocesses 11300\n"
        #expect(ProcessStat.parseBootTime(text) == 1_795_582_109)
        #expect(ProcessStat.parseBootTime("cpu 1 2 3\n") == nil)
    }

    @Test("converts start ticks to a date after boot")
    func convertsTicks() {
        let boot = Date(timeIntervalSince1970: 1_000_000)
        let date = ProcessStat.date(ofStartTicks: 250, bootTime: boot, ticksPerSecond: 100)
        #expect(date == Date(timeIntervalSince1970: 1_000_002.5))
    }

    @Test("this process started recently according to boot time and clock ticks")
    func realStartDate() throws {
        let boot = try #require(ProcessStat.bootTime())
        #expect(boot < Date())
        #expect(ProcessStat.clockTicksPerSecond > 0)
        let started = try #require(ProcessIdentity.current(pid: getpid())?.startDate)
        // Generous bounds: btime is fixed at boot, so clock adjustments since then skew the result a little.
        #expect(started > Date().addingTimeInterval(-86_400))
        #expect(started < Date().addingTimeInterval(60))
    }

    @Test("identities round-trip through Codable")
    func identityCodable() throws {
        let identity = ProcessIdentity(pid: 4242, startTime: 987_654_321)
        let decoded = try JSONDecoder().decode(ProcessIdentity.self, from: JSONEncoder().encode(identity))
        #expect(decoded == identity)
    }
}

// MARK: - Smaps

@Suite("Smaps and clone memory accounting")
struct SmapsTests {
    static let templatePath = "/var/lib/vmtemplate/templates/busybox/memory"

    /// Trimmed-down smaps of a QEMU clone: binary, heap, 256 MiB private template RAM mapping with
    /// 33000 kB written, TCG code buffer, a look-alike path, a path with spaces, stack and vdso.
    static let qemuSmaps = """
        55d4c3a00000-55d4c3c8e000 r--p 00000000 fd:01 1315143                    /usr/bin/qemu-system-x86_64
        Size:               2616 kB
        KernelPageSize:        4 kB
        MMUPageSize:           4 kB
        Rss:                2616 kB
        Pss:                 872 kB
        Pss_Dirty:             0 kB
        Shared_Clean:       2616 kB
        Shared_Dirty:          0 kB
        Private_Clean:         0 kB
        Private_Dirty:         0 kB
        Referenced:         2616 kB
        Anonymous:             0 kB
        KSM:                   0 kB
        LazyFree:              0 kB
        AnonHugePages:         0 kB
        ShmemPmdMapped:        0 kB
        FilePmdMapped:         0 kB
        Shared_Hugetlb:        0 kB
        Private_Hugetlb:       0 kB
        Swap:                  0 kB
        SwapPss:               0 kB
        Locked:                0 kB
        THPeligible:           0
        VmFlags: rd mr mw me sd
        55d4c4e21000-55d4c6221000 rw-p 00000000 00:00 0                          [heap]
        Size:              20480 kB
        KernelPageSize:        4 kB
        MMUPageSize:           4 kB
        Rss:               19876 kB
        Pss:               19876 kB
        Pss_Dirty:         19876 kB
        Shared_Clean:          0 kB
        Shared_Dirty:          0 kB
        Private_Clean:         0 kB
        Private_Dirty:     19876 kB
        Referenced:        19876 kB
        Anonymous:         19876 kB
        KSM:                   0 kB
        LazyFree:              0 kB
        AnonHugePages:         0 kB
        Swap:                512 kB
        SwapPss:             512 kB
        Locked:                0 kB
        THPeligible:           0
        VmFlags: rd wr mr mw me ac sd
        7f2a40000000-7f2a50000000 rw-p 00000000 fd:01 1835021                    /var/lib/vmtemplate/templates/busybox/memory
        Size:             262144 kB
        KernelPageSize:        4 kB
        MMUPageSize:           4 kB
        Rss:               98304 kB
        Pss:               49152 kB
        Pss_Dirty:         33000 kB
        Shared_Clean:      32768 kB
        Shared_Dirty:          0 kB
        Private_Clean:     32536 kB
        Private_Dirty:     33000 kB
        Referenced:        98304 kB
        Anonymous:         33000 kB
        KSM:                   0 kB
        LazyFree:              0 kB
        AnonHugePages:         0 kB
        ShmemPmdMapped:        0 kB
        FilePmdMapped:         0 kB
        Shared_Hugetlb:        0 kB
        Private_Hugetlb:       0 kB
        Swap:                  0 kB
        SwapPss:               0 kB
        Locked:                0 kB
        THPeligible:           0
        ProtectionKey:         0
        VmFlags: rd wr mr mw me ac sd mg
        7f2a50000000-7f2a58000000 rw-p 00000000 00:00 0 
        Size:             131072 kB
        KernelPageSize:        4 kB
        MMUPageSize:           4 kB
        Rss:               16384 kB
        Pss:               16384 kB
        Shared_Clean:          0 kB
        Shared_Dirty:          0 kB
        Private_Clean:         0 kB
        Private_Dirty:     16384 kB
        Referenced:        16384 kB
        Anonymous:         16384 kB
        Swap:                  0 kB
        VmFlags: rd wr ex mr mw me ac sd
        7f2a58000000-7f2a58400000 rw-p 00000000 fd:01 1835099                    /var/lib/vmtemplate/templates/busybox/memory.old
        Size:               4096 kB
        Rss:                4096 kB
        Private_Dirty:      4096 kB
        Anonymous:          4096 kB
        Swap:                  0 kB
        VmFlags: rd wr mr mw me ac sd
        7f2a58400000-7f2a58401000 r--s 00000000 00:1f 44                         /run/vmtemplate/clone dir/ctl (1)
        Size:                  4 kB
        Rss:                   4 kB
        Shared_Clean:          4 kB
        Anonymous:             0 kB
        VmFlags: rd mr me ms sd
        7ffc1e3a1000-7ffc1e3c2000 rw-p 00000000 00:00 0                          [stack]
        Size:                132 kB
        Rss:                  36 kB
        Private_Dirty:        36 kB
        Anonymous:            36 kB
        Swap:                  0 kB
        VmFlags: rd wr mr mw me gd ac
        7ffc1e3f0000-7ffc1e3f2000 r-xp 00000000 00:00 0                          [vdso]
        Size:                  8 kB
        Rss:                   4 kB
        Anonymous:             0 kB
        VmFlags: rd ex mr mw me de sd
        """

    static let qemuRollup = """
        55d4c3a00000-7ffc1e3f2000 ---p 00000000 00:00 0                          [rollup]
        Rss:              141324 kB
        Pss:               90000 kB
        Pss_Anon:          73392 kB
        Shared_Clean:      35388 kB
        Shared_Dirty:          0 kB
        Private_Clean:     32536 kB
        Private_Dirty:     73392 kB
        Referenced:       141324 kB
        Anonymous:         73392 kB
        KSM:                   0 kB
        LazyFree:              0 kB
        AnonHugePages:         0 kB
        Swap:                512 kB
        SwapPss:             512 kB
        Locked:                0 kB
        """

    @Test("parses every mapping's range, permissions, offset, inode and path")
    func parsesHeaders() throws {
        let mappings = Smaps.parse(Self.qemuSmaps)
        #expect(mappings.count == 8)
        let binary = try #require(mappings.first)
        #expect(binary.start == 0x55d4_c3a0_0000)
        #expect(binary.end == 0x55d4_c3c8_e000)
        #expect(binary.permissions == "r--p")
        #expect(binary.offset == 0)
        #expect(binary.device == "fd:01")
        #expect(binary.inode == 1_315_143)
        #expect(binary.path == "/usr/bin/qemu-system-x86_64")
        #expect(mappings[1].path == "[heap]")
        #expect(mappings[3].path == nil)
        #expect(mappings[3].inode == 0)
        #expect(mappings[5].path == "/run/vmtemplate/clone dir/ctl (1)")
        #expect(mappings[5].permissions == "r--s")
    }

    @Test("converts kB counters to bytes and skips lines without kB")
    func parsesFields() throws {
        let ram = try #require(Smaps.parse(Self.qemuSmaps).first(where: { $0.path == Self.templatePath }))
        #expect(ram.size == 256 * 1024 * 1024)
        #expect(ram.rss == 98304 * 1024)
        #expect(ram.anonymous == 33000 * 1024)
        #expect(ram.privateClean == 32536 * 1024)
        #expect(ram.privateDirty == 33000 * 1024)
        #expect(ram.sharedClean == 32768 * 1024)
        #expect(ram.sharedDirty == 0)
        #expect(ram.swap == 0)
        #expect(ram.fields["THPeligible"] == nil)
        #expect(ram.fields["ProtectionKey"] == nil)
        #expect(ram.fields["VmFlags"] == nil)
        #expect(!ram.isDeletedFile)
    }

    @Test("parses smaps_rollup into byte counters")
    func parsesRollup() {
        let rollup = Smaps.parseRollup(Self.qemuRollup)
        #expect(rollup["Anonymous"] == 73392 * 1024)
        #expect(rollup["Rss"] == 141_324 * 1024)
        #expect(rollup["Swap"] == 512 * 1024)
        #expect(rollup.count == 15)
    }

    @Test("the one-pass counters of the hot path agree with a full parse")
    func countersAgreeWithFullParse() {
        let counters = Smaps.counters(bytes: Array(Self.qemuSmaps.utf8), templatePaths: [Self.templatePath])
        let full = CloneMemoryUsage.measure(mappings: Smaps.parse(Self.qemuSmaps), rollup: nil, templatePaths: [Self.templatePath])
        #expect(counters.templateAnonymous == full.copyOnWriteBytes)
        #expect(counters.templateShared == full.templateResidentBytes)
        #expect(counters.totalAnonymous - counters.templateAnonymous == full.qemuPrivateBytes)
        #expect(counters.totalSwap == full.swapBytes)
        #expect(counters.templateAnonymous == 33000 * 1024)
    }

    @Test("the byte-level counters agree with a full parse on this process's own smaps, for every file it maps, spaces and (deleted) included")
    func countersAgreeOnRealSmaps() throws {
        let text = try Smaps.readText(pid: getpid(), name: "smaps")
        let mappings = Smaps.parse(text)
        let paths = Set(mappings.compactMap(\.path)).filter { $0.hasPrefix("/") }
        #expect(!paths.isEmpty)
        for path in paths.sorted().prefix(20) + ["/no such file", "/a path with spaces (deleted)"] {
            let counters = Smaps.counters(bytes: Array(text.utf8), templatePaths: [path])
            let full = CloneMemoryUsage.measure(mappings: mappings, rollup: nil, templatePaths: [path])
            #expect(counters.templateAnonymous == full.copyOnWriteBytes && counters.templateShared == full.templateResidentBytes, "\(path)")
        }
        let spaced = "7f0000000000-7f0000001000 rw-p 00000000 00:05 42                         /dev/shm/a b (deleted)\nRss:                   8 kB\nAnonymous:             4 kB\nSwap:                  0 kB\n"
        let counters = Smaps.counters(bytes: Array(spaced.utf8), templatePaths: ["/dev/shm/a b"])
        #expect(counters.templateAnonymous == 4096 && counters.templateShared == 4096 && counters.totalAnonymous == 4096)
    }

    @Test("splits a clone's memory into copy-on-write, shared template, QEMU private and swap")
    func measuresFixture() {
        let usage = CloneMemoryUsage.measure(smaps: Self.qemuSmaps, rollup: Self.qemuRollup, templatePaths: [Self.templatePath])
        #expect(usage.copyOnWriteBytes == 33000 * 1024)
        // Private_Clean template pages are page cache shared with the template, not this clone's cost.
        #expect(usage.templateResidentBytes == (98304 - 33000) * 1024)
        #expect(usage.qemuPrivateBytes == (73392 - 33000) * 1024)
        #expect(usage.swapBytes == 512 * 1024)
        #expect(usage.ownBytes == 73392 * 1024)
    }

    @Test("matches a template file that was deleted while mapped, but not look-alike paths")
    func measuresDeletedTemplate() {
        let deleted = Self.qemuSmaps.replacingOccurrences(
            of: Self.templatePath + "\n", with: Self.templatePath + " (deleted)\n"
        )
        #expect(Smaps.parse(deleted).contains(where: { $0.isDeletedFile }))
        let usage = CloneMemoryUsage.measure(smaps: deleted, rollup: Self.qemuRollup, templatePaths: [Self.templatePath])
        #expect(usage.copyOnWriteBytes == 33000 * 1024)

        let elsewhere = CloneMemoryUsage.measure(smaps: Self.qemuSmaps, rollup: Self.qemuRollup, templatePaths: ["/var/lib/vmtemplate/templates/busybox"])
        #expect(elsewhere.copyOnWriteBytes == 0)
        #expect(elsewhere.qemuPrivateBytes == 73392 * 1024)
    }

    @Test("without smaps_rollup, totals come from the mappings themselves")
    func measuresWithoutRollup() {
        let usage = CloneMemoryUsage.measure(smaps: Self.qemuSmaps, rollup: nil, templatePaths: [Self.templatePath])
        #expect(usage.copyOnWriteBytes == 33000 * 1024)
        #expect(usage.qemuPrivateBytes == (19876 + 16384 + 4096 + 36) * 1024)
        #expect(usage.swapBytes == 512 * 1024)
    }

    @Test("never reports negative QEMU memory when rollup and smaps disagree")
    func clampsInconsistentSnapshots() {
        let usage = CloneMemoryUsage.measure(smaps: Self.qemuSmaps, rollup: "Anonymous: 100 kB\n", templatePaths: [Self.templatePath])
        #expect(usage.qemuPrivateBytes == 0)
    }

    @Test("a process that is gone is reported as not found")
    func measuresMissingProcess() {
        let error = #expect(throws: VMTemplateError.self) {
            try CloneMemoryUsage.measure(pid: 0x3FFF_FFFF, templateFile: Self.templatePath)
        }
        #expect(error?.code == .notFound)
        #expect(error?.message.contains("is gone") == true)
        #expect(throws: VMTemplateError.self) { try Smaps.read(pid: 0x3FFF_FFFF) }
        #expect(throws: VMTemplateError.self) { try Smaps.readRollup(pid: 0x3FFF_FFFF) }
    }

    @Test("reads this process's smaps and rollup")
    func readsSelf() throws {
        let mappings = try Smaps.read(pid: getpid())
        #expect(!mappings.isEmpty)
        #expect(mappings.contains(where: { $0.path == "[stack]" }))
        let rollup = try Smaps.readRollup(pid: getpid())
        #expect((rollup["Rss"] ?? 0) > 0)
    }

    @Test("writing to a private mapping of a read-only file shows up as copy-on-write and leaves the file intact")
    func measuresRealCopyOnWrite() throws {
        let directory = try makeTemporaryDirectory("cow")
        defer { try? FileSystem.removeTree(path: directory) }
        let path = directory + "/memory"
        let size = 16 * 1024 * 1024
        let written = 4 * 1024 * 1024
        let original = Data((0..<size).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ $0 >> 12) })
        try original.write(to: URL(fileURLWithPath: path))
        try FileSystem.setMode(path: path, mode: 0o444)
        try FileManager.default.createSymbolicLink(atPath: directory + "/link", withDestinationPath: path)

        let fd = open(path, O_RDONLY | O_CLOEXEC)
        try #require(fd >= 0)
        defer { close(fd) }
        let mapping = try #require(mmap(nil, size, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0))
        try #require(mapping != UnsafeMutableRawPointer(bitPattern: -1))
        defer { munmap(mapping, size) }
        memset(mapping, 0xAB, written)
        #expect(mapping.load(fromByteOffset: written - 1, as: UInt8.self) == 0xAB)

        let usage = try CloneMemoryUsage.measure(pid: getpid(), templateFile: path)
        #expect(usage.copyOnWriteBytes >= UInt64(written))
        #expect(usage.copyOnWriteBytes < UInt64(5 * 1024 * 1024))
        #expect(usage.qemuPrivateBytes > 0)

        let viaLink = try CloneMemoryUsage.measure(pid: getpid(), templateFile: directory + "/link")
        #expect(viaLink.copyOnWriteBytes >= UInt64(written))

        #expect(try Data(contentsOf: URL(fileURLWithPath: path)) == original)
        #expect(fileMode(path) == 0o444)
    }

    @Test("usage round-trips through Codable")
    func usageCodable() throws {
        let usage = CloneMemoryUsage(copyOnWriteBytes: 1, templateResidentBytes: 2, qemuPrivateBytes: 3, swapBytes: 4)
        #expect(try JSONDecoder().decode(CloneMemoryUsage.self, from: JSONEncoder().encode(usage)) == usage)
    }
}

// MARK: - MemInfo

@Suite("MemInfo")
struct MemInfoTests {
    @Test("parses MemTotal and MemAvailable in bytes")
    func parses() throws {
        let text = "MemTotal:       24684092 kB\nMemFree:        23807040 kB\nMemAvailable:   24292980 kB\nBuffers:            3328 kB\nCached:           666776 kB\nHugePages_Total:       0\n"
        let info = try #require(MemInfo.parse(text))
        #expect(info.totalBytes == 24_684_092 * 1024)
        #expect(info.availableBytes == 24_292_980 * 1024)
    }

    @Test("estimates available memory on kernels without MemAvailable")
    func parsesOldKernel() throws {
        let info = try #require(MemInfo.parse("MemTotal: 1000 kB\nMemFree: 100 kB\nBuffers: 10 kB\nCached: 200 kB\n"))
        #expect(info.availableBytes == 310 * 1024)
    }

    @Test("returns nil without MemTotal")
    func rejectsIncomplete() {
        #expect(MemInfo.parse("MemFree: 100 kB\n") == nil)
        #expect(MemInfo.parse("") == nil)
    }

    @Test("reads this host's memory")
    func readsHost() throws {
        let info = try MemInfo.read()
        #expect(info.totalBytes > 0)
        #expect(info.availableBytes <= info.totalBytes)
    }
}

// MARK: - FileSystem

@Suite("FileSystem helpers")
struct FileSystemTests {
    @Test("atomic write replaces the file with exact mode and leaves no temporary files")
    func atomicWrite() throws {
        let directory = try makeTemporaryDirectory("atomic")
        defer { try? FileSystem.removeTree(path: directory) }
        let path = directory + "/state.json"

        try FileSystem.writeFileAtomically(path: path, data: Data("first".utf8), mode: 0o640)
        #expect(try String(contentsOfFile: path, encoding: .utf8) == "first")
        #expect(fileMode(path) == 0o640)

        try FileSystem.writeFileAtomically(path: path, data: Array("second, longer".utf8))
        #expect(try String(contentsOfFile: path, encoding: .utf8) == "second, longer")
        #expect(fileMode(path) == 0o644)

        try FileSystem.writeFileAtomically(path: path, data: [UInt8]())
        #expect(try Data(contentsOf: URL(fileURLWithPath: path)).isEmpty)

        #expect(try FileManager.default.contentsOfDirectory(atPath: directory) == ["state.json"])
    }

    @Test("atomic write into a missing directory names the path and leaves nothing behind")
    func atomicWriteMissingDirectory() throws {
        let directory = try makeTemporaryDirectory("atomic-missing")
        defer { try? FileSystem.removeTree(path: directory) }
        let error = #expect(throws: VMTemplateError.self) {
            try FileSystem.writeFileAtomically(path: directory + "/nope/state.json", data: Data("x".utf8))
        }
        #expect(error?.code == .ioError)
        #expect(error?.message.contains(directory + "/nope") == true)
        #expect(error?.message.contains("does not exist") == true)
        #expect(try FileManager.default.contentsOfDirectory(atPath: directory).isEmpty)
    }

    @Test("allocates a new file with its blocks reserved and refuses to overwrite one")
    func allocates() throws {
        let directory = try makeTemporaryDirectory("allocate")
        defer { try? FileSystem.removeTree(path: directory) }
        let path = directory + "/memory"
        let size: UInt64 = 8 * 1024 * 1024

        try FileSystem.allocateFile(path: path, size: size, mode: 0o600)
        var info = stat()
        #expect(stat(path, &info) == 0)
        #expect(UInt64(info.st_size) == size)
        #expect(UInt64(info.st_blocks) * 512 >= size)
        #expect(fileMode(path) == 0o600)

        let error = #expect(throws: VMTemplateError.self) { try FileSystem.allocateFile(path: path, size: 4096) }
        #expect(error?.code == .exists)
        #expect(error?.message.contains(path) == true)
        #expect(stat(path, &info) == 0 && UInt64(info.st_size) == size)

        try FileSystem.allocateFile(path: directory + "/empty", size: 0)
        #expect(exists(directory + "/empty"))
    }

    @Test("error messages say which path, what failed and what to do")
    func errorMessages() {
        let full = FileSystem.error("allocate 1 GiB for", path: "/store/t/memory", code: ENOSPC, permissionNeeded: "unused")
        #expect(full.code == .ioError)
        #expect(full.message == "could not allocate 1 GiB for '/store/t/memory': the file system is full; free space on it or use another store")
        #expect(full.causeText?.contains("No space left on device") == true)

        let denied = FileSystem.error("create", path: "/store/x", code: EACCES, permissionNeeded: "this user needs write permission on the directory '/store'")
        #expect(denied.message == "could not create '/store/x': permission denied; this user needs write permission on the directory '/store'")

        let other = FileSystem.error("sync", path: "/store/x", code: EINVAL, permissionNeeded: "unused")
        #expect(other.message.contains("Invalid argument"))
        #expect(other.message.contains("/store/x"))
    }

    @Test("syncs existing files and directories and reports missing ones")
    func syncs() throws {
        let directory = try makeTemporaryDirectory("sync")
        defer { try? FileSystem.removeTree(path: directory) }
        try FileSystem.writeFileAtomically(path: directory + "/f", data: Data("x".utf8))
        try FileSystem.fsyncFile(path: directory + "/f")
        try FileSystem.fsyncDirectory(path: directory)
        let error = #expect(throws: VMTemplateError.self) { try FileSystem.fsyncFile(path: directory + "/missing") }
        #expect(error?.message.contains(directory + "/missing") == true)
        #expect(throws: VMTemplateError.self) { try FileSystem.fsyncDirectory(path: directory + "/f") }
    }

    @Test("reports free space and changes modes")
    func spaceAndModes() throws {
        let directory = try makeTemporaryDirectory("space")
        defer { try? FileSystem.removeTree(path: directory) }
        #expect(try FileSystem.availableBytes(onFileSystemOf: directory) > 0)
        #expect(throws: VMTemplateError.self) { try FileSystem.availableBytes(onFileSystemOf: directory + "/missing") }

        try FileSystem.writeFileAtomically(path: directory + "/f", data: Data("x".utf8))
        try FileSystem.setMode(path: directory + "/f", mode: 0o444)
        #expect(fileMode(directory + "/f") == 0o444)
        let error = #expect(throws: VMTemplateError.self) { try FileSystem.setMode(path: directory + "/missing", mode: 0o444) }
        #expect(error?.code == .ioError)
    }

    @Test("removes a tree with read-only parts without following symlinks, and tolerates it being gone")
    func removesTree() throws {
        let outside = try makeTemporaryDirectory("outside")
        defer { try? FileSystem.removeTree(path: outside) }
        try FileSystem.writeFileAtomically(path: outside + "/keep", data: Data("keep".utf8))

        let root = try makeTemporaryDirectory("tree")
        try FileManager.default.createDirectory(atPath: root + "/a/b/c", withIntermediateDirectories: true)
        try FileSystem.writeFileAtomically(path: root + "/a/b/c/memory", data: Data("m".utf8), mode: 0o444)
        try FileSystem.writeFileAtomically(path: root + "/a/file with spaces", data: Data("f".utf8))
        try FileManager.default.createSymbolicLink(atPath: root + "/a/link-to-outside", withDestinationPath: outside)
        try FileManager.default.createSymbolicLink(atPath: root + "/dangling", withDestinationPath: root + "/nowhere")
        try FileSystem.setMode(path: root + "/a/b/c", mode: 0o555)
        try FileSystem.setMode(path: root + "/a/b", mode: 0o500)

        try FileSystem.removeTree(path: root)
        #expect(!exists(root))
        #expect(exists(outside + "/keep"))
        try FileSystem.removeTree(path: root)

        try FileSystem.writeFileAtomically(path: outside + "/single", data: Data("s".utf8))
        try FileSystem.removeTree(path: outside + "/single")
        #expect(!exists(outside + "/single"))
    }
}

// MARK: - FileLock

@Suite("FileLock")
struct FileLockTests {
    @Test("two locks on the same file exclude each other within one process")
    func exclusiveExcludes() throws {
        let directory = try makeTemporaryDirectory("lock")
        defer { try? FileSystem.removeTree(path: directory) }
        let path = directory + "/store.lock"
        let first = try FileLock(path: path)
        let second = try FileLock(path: path)
        #expect(exists(path))

        #expect(first.tryExclusive())
        #expect(!second.tryExclusive())
        #expect(!second.tryShared())
        first.unlock()
        #expect(second.tryExclusive())
        second.unlock()

        try first.withExclusive {
            #expect(!second.tryExclusive())
        }
        #expect(second.tryExclusive())
        second.unlock()
    }

    @Test("shared locks coexist and keep out an exclusive one")
    func sharedCoexists() throws {
        let directory = try makeTemporaryDirectory("lock-shared")
        defer { try? FileSystem.removeTree(path: directory) }
        let path = directory + "/store.lock"
        let first = try FileLock(path: path)
        let second = try FileLock(path: path)
        let third = try FileLock(path: path)
        try first.withShared {
            #expect(second.tryShared())
            #expect(!third.tryExclusive())
            second.unlock()
        }
        #expect(third.tryExclusive())
        third.unlock()
    }

    @Test("the lock descriptor is close-on-exec so spawned QEMU never inherits it")
    func closeOnExec() throws {
        let directory = try makeTemporaryDirectory("lock-cloexec")
        defer { try? FileSystem.removeTree(path: directory) }
        let lock = try FileLock(path: directory + "/store.lock")
        let flags = fcntl(lock.fileDescriptor, F_GETFD)
        #expect(flags >= 0)
        #expect(flags & FD_CLOEXEC != 0)
    }

    @Test("the async variant waits for the holder without blocking and releases afterwards")
    func asyncWaits() async throws {
        let directory = try makeTemporaryDirectory("lock-async")
        defer { try? FileSystem.removeTree(path: directory) }
        let path = directory + "/store.lock"
        let holder = try FileLock(path: path)
        #expect(holder.tryExclusive())

        let waiter = Task {
            let lock = try FileLock(path: path)
            return try await lock.withExclusive { ContinuousClock.now }
        }
        try await Task.sleep(nanoseconds: 200_000_000)
        let released = ContinuousClock.now
        holder.unlock()
        let acquired = try await waiter.value
        #expect(acquired >= released)
        #expect(holder.tryExclusive())
        holder.unlock()

        let shared = try await holder.withShared { 42 }
        #expect(shared == 42)
    }

    @Test("the async variant stops waiting when its task is cancelled")
    func asyncCancels() async throws {
        let directory = try makeTemporaryDirectory("lock-cancel")
        defer { try? FileSystem.removeTree(path: directory) }
        let path = directory + "/store.lock"
        let holder = try FileLock(path: path)
        #expect(holder.tryExclusive())
        defer { holder.unlock() }

        let waiter = Task {
            let lock = try FileLock(path: path)
            return try await lock.withExclusive { true }
        }
        try await Task.sleep(nanoseconds: 50_000_000)
        waiter.cancel()
        await #expect(throws: CancellationError.self) { try await waiter.value }
    }

    @Test("opening a lock in a missing directory explains what failed")
    func missingDirectory() {
        let error = #expect(throws: VMTemplateError.self) { try FileLock(path: "/nonexistent-vmtemplate-dir/store.lock") }
        #expect(error?.message.contains("/nonexistent-vmtemplate-dir/store.lock") == true)
    }
}

// MARK: - KVMProbe

@Suite("KVMProbe")
struct KVMProbeTests {
    /// A fake /sys/module containing the given module directories plus an unrelated one.
    private func fakeModules(_ names: [String]) throws -> String {
        let directory = try makeTemporaryDirectory("modules")
        for name in names + ["ext4", "kvmfake"] {
            try FileManager.default.createDirectory(atPath: directory + "/" + name + "/parameters", withIntermediateDirectories: true)
        }
        return directory
    }

    @Test("lists only kvm modules from the module directory")
    func listsModules() throws {
        let directory = try fakeModules(["kvm", "kvm_pvm", "kvm_intel"])
        defer { try? FileSystem.removeTree(path: directory) }
        #expect(KVMProbe.kvmModules(in: directory) == ["kvm", "kvm_intel", "kvm_pvm"])
        #expect(KVMProbe.kvmModules(in: directory + "/missing") == [])
    }

    @Test("a missing device is never usable, whatever modules are loaded")
    func missingDevice() throws {
        let directory = try fakeModules(["kvm", "kvm_intel"])
        defer { try? FileSystem.removeTree(path: directory) }
        let probe = KVMProbe.probe(devicePath: directory + "/no-kvm", sysModuleDir: directory)
        #expect(!probe.devicePresent)
        #expect(!probe.deviceUsable)
        #expect(!probe.usableForStockGuests)
        #expect(probe.modules == ["kvm", "kvm_intel"])
        #expect(probe.reason.contains("does not exist"))
        #expect(probe.reason.contains("TCG"))
    }

    @Test("a device that is not KVM is present but unusable")
    func notAKVMDevice() throws {
        let directory = try fakeModules(["kvm", "kvm_intel"])
        defer { try? FileSystem.removeTree(path: directory) }
        try FileSystem.writeFileAtomically(path: directory + "/kvm-file", data: Data())
        let probe = KVMProbe.probe(devicePath: directory + "/kvm-file", sysModuleDir: directory)
        #expect(probe.devicePresent)
        #expect(!probe.deviceUsable)
        #expect(!probe.usableForStockGuests)
        #expect(probe.reason.contains("not a KVM device"))
    }

    @Test(
        "a working device is usable for stock guests only when provided by kvm_intel or kvm_amd",
        arguments: [
            (["kvm", "kvm_intel"], true),
            (["kvm", "kvm_amd"], true),
            (["kvm", "kvm_intel", "kvm_pvm"], true),
            (["kvm", "kvm_pvm"], false),
            (["kvm"], false),
            ([], false),
        ] as [([String], Bool)]
    )
    func rule(modules: [String], usable: Bool) {
        let probe = KVMProbe.decide(devicePath: "/dev/kvm", devicePresent: true, apiVersion: 12, deviceProblem: nil, modules: modules)
        #expect(probe.deviceUsable)
        #expect(probe.usableForStockGuests == usable)
    }

    @Test("PVM gets the documented explanation")
    func pvmReason() {
        let probe = KVMProbe.decide(devicePath: "/dev/kvm", devicePresent: true, apiVersion: 12, deviceProblem: nil, modules: ["kvm", "kvm_pvm"])
        #expect(probe.reason == "/dev/kvm is provided by kvm_pvm (PVM), which hangs stock guest kernels; use TCG")
    }

    @Test("a wrong API version or an unopenable device is not usable")
    func unusableDevice() {
        let old = KVMProbe.decide(devicePath: "/dev/kvm", devicePresent: true, apiVersion: 11, deviceProblem: nil, modules: ["kvm", "kvm_intel"])
        #expect(!old.deviceUsable)
        #expect(!old.usableForStockGuests)
        #expect(old.reason.contains("version 11"))

        let denied = KVMProbe.decide(devicePath: "/dev/kvm", devicePresent: true, apiVersion: nil, deviceProblem: "permission denied; join kvm", modules: ["kvm", "kvm_intel"])
        #expect(!denied.usableForStockGuests)
        #expect(denied.reason == "permission denied; join kvm")
    }

    @Test("on this host, a kvm_pvm-backed /dev/kvm is reported unusable for stock guests")
    func realProbe() throws {
        let probe = KVMProbe.probe()
        let decoded = try JSONDecoder().decode(KVMProbe.self, from: JSONEncoder().encode(probe))
        #expect(decoded == probe)
        #expect(!probe.reason.isEmpty)
        let hasPVM = exists("/sys/module/kvm_pvm")
        let hasHardware = exists("/sys/module/kvm_intel") || exists("/sys/module/kvm_amd")
        if hasPVM && !hasHardware {
            #expect(!probe.usableForStockGuests)
            #expect(probe.modules.contains("kvm_pvm"))
        }
        if !exists("/dev/kvm") {
            #expect(!probe.devicePresent)
            #expect(!probe.usableForStockGuests)
        }
    }
}

@Suite("copying a disk image sparsely")
struct SparseCopyTests {
    @Test("the copy has the same bytes and size, its holes stay holes, and an existing file is never overwritten")
    func copy() throws {
        let source = "/tmp/vmt-sparse-\(UUID().uuidString.prefix(8))"
        let target = source + ".copy"
        defer { unlink(source); unlink(target) }
        FileManager.default.createFile(atPath: source, contents: nil)
        let handle = try #require(FileHandle(forWritingAtPath: source))
        try handle.write(contentsOf: Data(repeating: 0x41, count: 4096))
        try handle.seek(toOffset: 64 << 20)
        try handle.write(contentsOf: Data("end".utf8))
        try handle.close()
        let fd = open(source, O_RDONLY | O_CLOEXEC)
        defer { close(fd) }
        try FileSystem.copySparse(from: fd, toNewFile: target, mode: 0o600)
        #expect(FileManager.default.contents(atPath: target) == FileManager.default.contents(atPath: source))
        var info = stat()
        #expect(stat(target, &info) == 0 && info.st_size == (64 << 20) + 3 && info.st_mode & 0o777 == 0o600)
        #expect(info.st_blocks * 512 < 1 << 20, "the 64 MiB hole was not written out")
        #expect(throws: VMTemplateError.self) { try FileSystem.copySparse(from: fd, toNewFile: target, mode: 0o600) }
    }
}
