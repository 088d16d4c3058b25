#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
import Foundation

/// The fields of `/proc/PID/stat` that matter here: state, start time, CPU time and command name.
public struct ProcessStat: Sendable, Equatable {
    /// The process id.
    public var pid: Int32
    /// The state letter: R running, S sleeping, D disk sleep, Z zombie, T stopped, X dead, etc.
    public var state: Character
    /// When the process started, in clock ticks since boot (field 22); unique per pid over a boot.
    public var startTimeTicks: UInt64
    /// The command name (at most 15 bytes; may contain spaces and parentheses).
    public var comm: String
    /// CPU time of all its threads, user and system (fields 14 and 15), in clock ticks.
    public var cpuTicks: UInt64

    /// Creates a stat record; normally obtained from `read(pid:)` or `parse(_:)`.
    public init(pid: Int32, state: Character, startTimeTicks: UInt64, comm: String, cpuTicks: UInt64 = 0) {
        self.pid = pid
        self.state = state
        self.startTimeTicks = startTimeTicks
        self.comm = comm
        self.cpuTicks = cpuTicks
    }

    /// True for a zombie or dead process, which holds its pid but runs nothing and holds no memory.
    public var isDefunct: Bool {
        state == "Z" || state == "X" || state == "x"
    }

    /// Parses the text of `/proc/PID/stat`, or returns nil if it is malformed.
    ///
    /// `comm` may contain spaces and ')' (a process can name itself anything), so the fields after it
    /// are found from the last ')' in the line rather than by splitting on spaces.
    public static func parse(_ text: String) -> ProcessStat? {
        guard let open = text.firstIndex(of: "("), let close = text.lastIndex(of: ")"), open < close else {
            return nil
        }
        guard let pid = Int32(text[..<open].trimmingCharacters(in: .whitespaces)) else { return nil }
        let comm = String(text[text.index(after: open)..<close])
        let rest = text[text.index(after: close)...].split(whereSeparator: { $0 == " " || $0 == "\n" })
        // rest[0] is field 3 (state), so utime and stime (14, 15) are rest[11] and rest[12], and
        // starttime (22) is rest[19].
        guard rest.count > 19, rest[0].count == 1, let state = rest[0].first,
              let startTime = UInt64(rest[19]), let user = UInt64(rest[11]), let system = UInt64(rest[12])
        else { return nil }
        let (cpu, overflow) = user.addingReportingOverflow(system)
        return ProcessStat(pid: pid, state: state, startTimeTicks: startTime, comm: comm, cpuTicks: overflow ? .max : cpu)
    }

    /// Reads `/proc/PID/stat`, or returns nil if the process does not exist (any more).
    public static func read(pid: Int32) -> ProcessStat? {
        guard pid > 0, case .success(let text) = FileSystem.readText(path: "/proc/\(pid)/stat") else { return nil }
        return parse(text)
    }

    // MARK: - Turning start ticks into dates

    /// Clock ticks per second (USER_HZ), the unit of `startTimeTicks`; almost always 100.
    public static var clockTicksPerSecond: UInt64 {
        let ticks = sysconf(Int32(_SC_CLK_TCK))
        return ticks > 0 ? UInt64(ticks) : 100
    }

    /// Extracts `btime` (boot time, seconds since the epoch) from the text of `/proc/stat`.
    public static func parseBootTime(_ procStatText: String) -> UInt64? {
        for line in procStatText.split(separator: "\n") where line.hasPrefix("btime ") {
            return UInt64(line.dropFirst("btime ".count).trimmingCharacters(in: .whitespaces))
        }
        return nil
    }

    /// When the system booted, from `btime` in `/proc/stat`, or nil if it cannot be read.
    public static func bootTime() -> Date? {
        guard case .success(let text) = FileSystem.readText(path: "/proc/stat"),
              let seconds = parseBootTime(text)
        else { return nil }
        return Date(timeIntervalSince1970: TimeInterval(seconds))
    }

    /// The wall-clock time of `startTicks` ticks after boot, or nil if the boot time cannot be read.
    public static func date(ofStartTicks startTicks: UInt64) -> Date? {
        guard let boot = bootTime() else { return nil }
        return date(ofStartTicks: startTicks, bootTime: boot, ticksPerSecond: clockTicksPerSecond)
    }

    /// The pure form of `date(ofStartTicks:)`, for tests and for converting many values at once.
    public static func date(ofStartTicks startTicks: UInt64, bootTime: Date, ticksPerSecond: UInt64) -> Date {
        bootTime.addingTimeInterval(TimeInterval(startTicks) / TimeInterval(max(ticksPerSecond, 1)))
    }

    /// When this process started, for uptime display; nil if the boot time cannot be read.
    public var startDate: Date? {
        ProcessStat.date(ofStartTicks: startTimeTicks)
    }
}

/// A process named by pid and start time, so a recycled pid is never mistaken for the original.
public struct ProcessIdentity: Sendable, Codable, Hashable {
    /// The process id.
    public var pid: Int32
    /// The start time in clock ticks since boot, from `/proc/PID/stat` field 22.
    public var startTime: UInt64

    /// Creates an identity from recorded values (e.g. decoded from a state file).
    public init(pid: Int32, startTime: UInt64) {
        self.pid = pid
        self.startTime = startTime
    }

    /// The identity of the process now running as `pid`, or nil if there is none.
    ///
    /// A zombie still gets an identity (it is still that process); `isAlive` is false for it.
    public static func current(pid: Int32) -> ProcessIdentity? {
        ProcessStat.read(pid: pid).map { ProcessIdentity(pid: $0.pid, startTime: $0.startTimeTicks) }
    }

    /// True only if this exact process still exists and is not a zombie or dead.
    ///
    /// Start times only mean something within one boot, which is fine: nothing survives a reboot.
    public var isAlive: Bool {
        isAlive(given: ProcessStat.read(pid: pid))
    }

    /// Whether the process is known to be gone: no `/proc/PID` (ENOENT), or one that holds another
    /// process (a reused PID) or a zombie. A read that fails otherwise (out of descriptors) proves
    /// nothing, unlike `!isAlive`: what records an exit or removes a clone asks this.
    public var isKnownGone: Bool {
        let fd = open("/proc/\(pid)/stat", O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return errno == ENOENT || errno == ESRCH }
        close(fd)
        guard let stat = ProcessStat.read(pid: pid) else { return false }
        return !isAlive(given: stat)
    }

    /// The decision behind `isAlive`, given what `/proc/PID/stat` said (nil: it did not exist).
    public func isAlive(given stat: ProcessStat?) -> Bool {
        guard let stat else { return false }
        return stat.pid == pid && stat.startTimeTicks == startTime && !stat.isDefunct
    }

    /// When the process started, for uptime display; nil if the boot time cannot be read.
    public var startDate: Date? {
        ProcessStat.date(ofStartTicks: startTime)
    }

    // snake_case like every other key vmtemplate writes; `startTime`, which records and
    // owner files had before 0.3, is still read.
    enum CodingKeys: String, CodingKey {
        case pid
        case startTime = "start_time"
        case legacyStartTime = "startTime"
    }

    public init(from decoder: any Decoder) throws {
        let container = try decoder.container(keyedBy: CodingKeys.self)
        pid = try container.decode(Int32.self, forKey: .pid)
        startTime = try container.decodeIfPresent(UInt64.self, forKey: .startTime) ?? container.decode(UInt64.self, forKey: .legacyStartTime)
    }

    public func encode(to encoder: any Encoder) throws {
        var container = encoder.container(keyedBy: CodingKeys.self)
        try container.encode(pid, forKey: .pid)
        try container.encode(startTime, forKey: .startTime)
    }
}
