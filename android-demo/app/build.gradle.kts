plugins {
    id("com.android.application")
    id("org.jetbrains.kotlin.android")
}

val onnxruntimeVersion = "1.29.0" // = android-demo/pom.xml and pyproject.toml: the same kernels as `koedge run`

android {
    namespace = "org.koedge.demo"
    compileSdk = 35

    defaultConfig {
        applicationId = "org.koedge.demo"
        minSdk = 24
        targetSdk = 35
        versionCode = 1
        versionName = "0.1.0"
        ndk {
            abiFilters += listOf("arm64-v8a") // phones; add "x86_64" to run in the emulator
        }
    }

    sourceSets["main"].java.srcDirs("src/main/kotlin")
    sourceSets["test"].java.srcDirs("src/test/kotlin")

    compileOptions {
        sourceCompatibility = JavaVersion.VERSION_1_8
        targetCompatibility = JavaVersion.VERSION_1_8
    }

    packaging {
        jniLibs {
            useLegacyPackaging = true // extractNativeLibs, as tools/build-apk.sh
        }
    }

    testOptions {
        unitTests.isIncludeAndroidResources = false
    }
}

kotlin {
    compilerOptions {
        jvmTarget.set(org.jetbrains.kotlin.gradle.dsl.JvmTarget.JVM_1_8)
    }
}

dependencies {
    implementation(project(":engine"))
    implementation("com.microsoft.onnxruntime:onnxruntime-android:$onnxruntimeVersion")
    testImplementation("junit:junit:4.13.2")
    testImplementation("org.robolectric:robolectric:4.17")
    testImplementation("com.microsoft.onnxruntime:onnxruntime:$onnxruntimeVersion")
}
