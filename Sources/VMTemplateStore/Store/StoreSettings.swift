import VMTemplateOS
import VMTemplateQEMU
import Foundation

/// What the scheduler does to a clone over its copy-on-write limit.
public enum OverLimitAction: String, Sendable, Codable, CaseIterable {
    /// QMP `stop`: the guest freezes, its memory stays; `vmtemplate resume` continues it.
    case pause
    /// SIGKILL: the memory is returned at once; the clone shows as `exited`.
    case kill
}

/// Store-wide limits, in `ROOT/settings.json`. Absent fields mean "no limit".
public struct StoreSettings: Sendable, Codable, Equatable {
    /// Live clones the store admits at most.
    public var maxClones: Int?
    /// Memory all live clones may commit together (see `Admission`).
    public var memoryBudgetBytes: UInt64?
    /// What the scheduler does to a clone over its limit, unless the clone says otherwise.
    public var overLimitAction: OverLimitAction
    /// Seconds between two samples of the scheduler.
    public var intervalSeconds: Double
    /// Rounds in a row in which the scheduler may fail to pause a clone over its limit (QMP does
    /// not answer, `stop` fails) before it stops the clone with the stop ladder instead: a limit
    /// must not fail open.
    public var pauseAttempts: Int
    /// The attempts believed.
    public static let pauseAttemptsRange: ClosedRange<Int> = 1...100
    /// The intervals believed, from a file or an option.
    public static let intervalRange: ClosedRange<Double> = 0.05...3600

    public init(maxClones: Int? = nil, memoryBudgetBytes: UInt64? = nil, overLimitAction: OverLimitAction = .pause, intervalSeconds: Double = 1, pauseAttempts: Int = 3) {
        self.pauseAttempts = pauseAttempts
        self.maxClones = maxClones
        self.memoryBudgetBytes = memoryBudgetBytes
        self.overLimitAction = overLimitAction
        self.intervalSeconds = intervalSeconds
    }

    enum CodingKeys: String, CodingKey {
        case maxClones = "max_clones"
        case memoryBudgetBytes = "memory_budget_bytes"
        case overLimitAction = "over_limit_action"
        case intervalSeconds = "interval_seconds"
        case pauseAttempts = "pause_attempts"
    }

    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        maxClones = try c.decodeIfPresent(Int.self, forKey: .maxClones)
        memoryBudgetBytes = try c.decodeIfPresent(UInt64.self, forKey: .memoryBudgetBytes)
        overLimitAction = try c.decodeIfPresent(OverLimitAction.self, forKey: .overLimitAction) ?? .pause
        intervalSeconds = try c.decodeIfPresent(Double.self, forKey: .intervalSeconds) ?? 1
        pauseAttempts = try c.decodeIfPresent(Int.self, forKey: .pauseAttempts) ?? 3
        if let problem = problem {
            throw DecodingError.dataCorrupted(.init(codingPath: decoder.codingPath, debugDescription: problem))
        }
    }

    /// Why these settings are out of bounds, or nil.
    public var problem: String? {
        if let maxClones, !(0...1_000_000).contains(maxClones) { return "max_clones must be 0 to 1000000" }
        if let memoryBudgetBytes, memoryBudgetBytes > 1 << 60 { return "memory_budget_bytes is out of range" }
        if !Self.intervalRange.contains(intervalSeconds) { return "interval_seconds must be between 0.05 and 3600" }
        if !Self.pauseAttemptsRange.contains(pauseAttempts) { return "pause_attempts must be 1 to 100" }
        return nil
    }

    public func encode(to encoder: any Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        // Explicit nulls: `settings --json` shows every knob, set or not.
        try c.encode(maxClones, forKey: .maxClones)
        try c.encode(memoryBudgetBytes, forKey: .memoryBudgetBytes)
        try c.encode(overLimitAction, forKey: .overLimitAction)
        try c.encode(intervalSeconds, forKey: .intervalSeconds)
        try c.encode(pauseAttempts, forKey: .pauseAttempts)
    }
}

extension TemplateStore {
    var settingsPath: String { "\(root)/settings.json" }

    /// The store's settings (defaults when there is no settings file).
    public func settings() throws -> StoreSettings {
        switch StoredJSON.read(StoreSettings.self, at: settingsPath, owner: ownerUID) {
        case .success(let settings):
            return settings
        case .failure(.missing):
            return StoreSettings()
        case .failure(let failure):
            throw VMTemplateError(.invalidState, "settings file '\(settingsPath)' cannot be used because \(failure): fix it, or remove it (rm \(settingsPath)) and set the limits again with 'vmtemplate settings'.")
        }
    }

    /// Changes the settings under the store lock, so concurrent changes are not lost.
    public func updateSettings(isolation: isolated (any Actor)? = #isolation, _ change: (inout StoreSettings) throws -> Void) async throws -> StoreSettings {
        let path = settingsPath
        let updated = try await withLock { try $0.update(StoreSettings.self, at: path, default: StoreSettings()) { settings in
            try change(&settings)
            if let problem = settings.problem {
                throw VMTemplateError(.invalidArgument, "\(problem): give a value in range.")
            }
        } }
        return updated ?? StoreSettings()
    }
}
